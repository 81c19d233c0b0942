"""pytest plugin: a scratch OpenSSH server for the tests (filled in by the backends work)."""
