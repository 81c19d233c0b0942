"""Benchmarks of raw-transfer against baselines measured in the same invocation.

``python -m benchmarks`` (see ``__main__``) is the harness of issue 9: it makes its own
frames, runs raw-transfer and the baselines (bare fpack, the upstream-style chain, rsync)
to a local directory and to a scratch sshd on 127.0.0.1, and writes a table in Markdown
and JSON. ``sftp_throughput.py`` and ``memory.py`` are older single-purpose scripts.
"""
