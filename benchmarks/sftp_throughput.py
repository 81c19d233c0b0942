"""Measure the SSH destination: one large frame and many small files, tuned vs paramiko.

    .venv/bin/python benchmarks/sftp_throughput.py                 # scratch sshd on loopback
    .venv/bin/python benchmarks/sftp_throughput.py --size-mb 100 --small 50 --runs 3
    .venv/bin/python benchmarks/sftp_throughput.py --dest user@host:/scratch/dir

"tuned" is SftpDestination.publish as the pipeline uses it (temporary name, fsync,
hardlink, remove), plus the remote sha1sum for the verify step. "paramiko defaults" is
what a plain SSHClient gives: its preferred cipher (aes128-ctr + hmac-sha2-256), a 2 MiB
window, 32 KiB requests, Nagle on; "put" pipelines those requests (SFTPClient.put), the
"naive write" loop does not (SFTPFile.write without set_pipelined). Not part of the test
suite: numbers depend on the machine, and tests must not assert timings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rawtransfer.config import RemoteDest, parse_dest
from rawtransfer.destination import sftp
from rawtransfer.destination.sftp import SftpDestination
from rawtransfer.destination.ssh_target import SshTarget, default_ssh_config, resolve_target

MB = 1_000_000


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def median_rate(runs: list[float], nbytes: int) -> str:
    rates = [nbytes / MB / t for t in runs]
    return f"{statistics.median(rates):7.1f} MB/s  (runs: {', '.join(f'{r:.0f}' for r in rates)})"


def per_file(seconds: float, n: int) -> str:
    return f"{seconds / n * 1000:7.2f} ms/file"


@contextlib.contextmanager
def scratch_server() -> Iterator[tuple[RemoteDest, dict[str, Path], Path]]:
    from tests.ssh_fixture import running_sshd

    with (
        tempfile.TemporaryDirectory(prefix="rt-bench-") as tmp,
        running_sshd(Path(tmp)) as server,
    ):
        root = server.scratch / "archive"
        root.mkdir()
        kw = {"ssh_config": server.ssh_config, "known_hosts": server.known_hosts}
        yield RemoteDest(server.alias, str(root)), kw, root


def default_client(t: SshTarget) -> paramiko.SSHClient:
    """Connect the way most paramiko code does: SSHClient, everything left at defaults."""
    client = paramiko.SSHClient()
    for path in t.known_hosts:
        if path.is_file():
            client.load_system_host_keys(str(path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        t.hostname,
        port=t.port,
        username=t.user,
        key_filename=list(t.identities) or None,
        look_for_keys=not t.identities,
        allow_agent=not t.identities,
    )
    return client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", help="user@host:/dir to measure a real server (default: loopback)")
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", type=int, default=50, help="number of 100 KB files")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow unpipelined case")
    args = ap.parse_args()

    kw: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        if args.dest:
            parsed = parse_dest(args.dest)
            if not isinstance(parsed, RemoteDest):
                ap.error("--dest must be user@host:/path or alias:/path")
            dest = parsed
        else:
            dest, kw, _ = stack.enter_context(scratch_server())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rt-bench-src-")))
        run(args, dest, kw, tmp)


def run(args: argparse.Namespace, dest: RemoteDest, kw: dict[str, Path], tmp: Path) -> None:
    size = args.size_mb * MB
    big = tmp / "big.fits.fz"
    with big.open("wb") as fh:
        for _ in range(args.size_mb):
            fh.write(os.urandom(MB))
    big_sha1 = sha1_hex(big.read_bytes())
    small = []
    for i in range(args.small):
        p = tmp / f"small{i}.fits.fz"
        p.write_bytes(os.urandom(100_000))
        small.append((p, sha1_hex(p.read_bytes())))
    target = resolve_target(
        dest, kw.get("ssh_config") or default_ssh_config(), known_hosts=kw.get("known_hosts")
    )
    stamp = f"{int(time.time())}-{os.getpid()}"
    rel = PurePosixPath(f"bench-{stamp}")
    no_stop = threading.Event()
    remote_dir = f"{dest.path.rstrip('/')}/{rel}"

    # -- tuned: the destination as the pipeline uses it ----------------------------------
    d = SftpDestination(dest, copy_timeout=600, **kw)  # type: ignore[arg-type]
    d.check()
    conn = d._local.conn
    print(
        f"target {target.user}@{target.hostname}:{target.port}; tuned connection: "
        f"{conn.transport.local_cipher}, "
        f"{conn.request_size >> 10} KiB requests"
    )
    tuned, verify = [], []
    for i in range(args.runs):
        r = rel / f"big{i}.fits.fz"
        t0 = time.perf_counter()
        d.publish(big, r, big_sha1, no_stop)
        t1 = time.perf_counter()
        d.sha1(r)
        tuned.append(t1 - t0)
        verify.append(time.perf_counter() - t1)

    def small_files(dst: SftpDestination, tag: str, check: bool = False) -> float:
        t0 = time.perf_counter()
        for p, digest in small:
            dst.publish(p, rel / f"{tag}-{p.name}", digest, no_stop)
            if check:
                dst.sha1(rel / f"{tag}-{p.name}")
        return time.perf_counter() - t0

    t_small = small_files(d, "s")
    t_small_v = small_files(d, "v", check=True)
    d.sha1_method = "read-back"  # as on an SFTP-only server
    t_small_rb = small_files(d, "r", check=True)
    d.close()

    # -- tuned, but Nagle left on ------------------------------------------------------
    sftp.TCP_NODELAY = False
    d = SftpDestination(dest, copy_timeout=600, **kw)  # type: ignore[arg-type]
    t_small_nagle = small_files(d, "n")
    d.close()
    sftp.TCP_NODELAY = True

    # -- paramiko defaults -------------------------------------------------------------
    client = default_client(target)
    transport = client.get_transport()
    s = client.open_sftp()
    default_cipher = f"{transport.local_cipher} + {transport.local_mac}"
    put = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        s.put(str(big), f"{remote_dir}/put{i}")
        put.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for p, _ in small:
        s.put(str(p), f"{remote_dir}/p-{p.name}")
    t_small_put = time.perf_counter() - t0
    naive_runs = []
    if not args.skip_naive:
        t0 = time.perf_counter()
        with big.open("rb") as src, s.open(f"{remote_dir}/naive", "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        naive_runs.append(time.perf_counter() - t0)
    client.close()
    n_fresh = min(10, len(small))
    t0 = time.perf_counter()
    for p, _ in small[:n_fresh]:
        c = default_client(target)
        try:
            c.open_sftp().put(str(p), f"{remote_dir}/f-{p.name}")
        finally:
            c.close()
    t_small_fresh = time.perf_counter() - t0

    print(f"\n{args.size_mb} MB file of random bytes, median of {args.runs}:")
    print(f"  tuned publish (tmp + fsync + hardlink)  {median_rate(tuned, size)}")
    print(f"  remote sha1sum (verify)                 {statistics.median(verify):7.2f} s")
    print(f"  paramiko defaults, put()                {median_rate(put, size)}  [{default_cipher}]")
    if naive_runs:
        print(f"  paramiko defaults, naive write()        {median_rate(naive_runs, size)}")
    print(f"\n{args.small} files of 100 KB, one after the other:")
    print(f"  tuned publish                           {per_file(t_small, args.small)}")
    print(f"  tuned publish + remote sha1sum          {per_file(t_small_v, args.small)}")
    print(f"  tuned publish + read-back SHA1          {per_file(t_small_rb, args.small)}")
    print(f"  tuned publish, Nagle on (no NODELAY)    {per_file(t_small_nagle, args.small)}")
    print(f"  paramiko defaults, put(), same conn.    {per_file(t_small_put, args.small)}")
    print(f"  paramiko defaults, new connection each  {per_file(t_small_fresh, n_fresh)}")
    if args.dest:
        print(f"\n(the files written are left under {remote_dir})")


if __name__ == "__main__":
    main()
