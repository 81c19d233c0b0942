"""Allow ``python -m rawtransfer``."""

from rawtransfer.cli import main

raise SystemExit(main())
