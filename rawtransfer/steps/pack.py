"""pack: lossless, deterministic tile compression with fpack, verified before use.

``fpack -C`` leaves checksum keywords alone, so its output carries no time stamp and the
same input always gives byte-identical output (a retry or a duplicate hashes the same).
Integer images use Rice. fpack's default for floating-point images is lossy
quantisation, so floats are packed with GZIP_2 and ``-q 0``, which is lossless.

fpack's exit status is not trusted: a corrupted ``.fz`` still unpacks with exit 0. The
packed file is decompressed in-process and every HDU's data compared, bit for bit, with
the original's before anything relies on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from astropy.io import fits

from rawtransfer.deadlines import Deadlines
from rawtransfer.destination.base import CHUNK, TMP_SUFFIX
from rawtransfer.errors import PackError
from rawtransfer.steps import hashing
from rawtransfer.steps.settle import BLOCK, data_size

log = logging.getLogger(__name__)

# fpack packs a 100 MB frame in one to two seconds; ten minutes means it is stuck
# (a hung NFS read, say), not slow, and the worker must get its thread back.
FPACK_TIMEOUT = 600.0


def fpack_args(float_images: bool) -> list[str]:
    args = ["fpack", "-C"]
    if float_images:
        args += ["-g2", "-q", "0"]
    else:
        args += ["-r"]
    return args


def spool_name(spool: Path) -> Path:
    """A unique, hidden temporary name in the spool, created exclusively (never reused)."""
    return spool / f".{uuid.uuid4().hex}.fits.fz{TMP_SUFFIX}"


# Each HDU's header and the offset of its data in the file, in file order.
Layout = list[tuple[fits.Header, int]]


@dataclass(frozen=True)
class Packed:
    """A packed file in the spool, its SHA1, and the SHA1 of the raw bytes it came from
    (the raw SHA1 taken while fpack reads the same inode, the packed one as fpack's
    output went by: the packed file is never read again to be hashed)."""

    path: Path
    sha1: str
    raw_sha1: str


def pack(source: Path, spool: Path, *, float_images: bool) -> Path:
    """fpack ``source`` into a new, verified file in ``spool`` (see pack_hashed)."""
    return pack_hashed(source, spool, float_images=float_images).path


def pack_hashed(
    source: Path,
    spool: Path,
    *,
    float_images: bool,
    between: Callable[[], None] | None = None,
    layout: Layout | None = None,
) -> Packed:
    """fpack ``source`` into a new file in ``spool``, verify it, return it with hashes.

    fpack reads the file through a descriptor this process opened and hands down
    (``/dev/fd/N``): CFITSIO reads file *names* with its extended syntax (``x.fits[1]``,
    ``$VAR``, ``(out)``...), so a camera's file name must never reach it, and a file is
    half as dear to fpack as standard input, which it first copies whole into memory
    (0.38 s of CPU and 10 MB for a 100 MB frame, against 0.7 s and 156 MB). The raw SHA1
    is taken while fpack works, from the same inode (fpack writes its output only when
    it has read everything, so nothing waits on the other). The packed bytes come back
    on standard output, are hashed as they arrive and are written here, not by fpack,
    because fpack exits 0 even when its output could not be written (a full spool),
    whereas here the write fails with ENOSPC and says so. ``between`` runs after packing
    and before the proof (a fault point); ``layout`` is the original's, if known.
    """
    out = spool_name(spool)
    packed_hash = hashlib.sha1(usedforsecurity=False)
    try:
        with _inherited(source) as (fd, name), open(out, "xb") as outp:
            with _child([*fpack_args(float_images), "-S", name], fd) as (proc, ended):
                assert proc.stdout is not None
                raw_sha1 = hashing.sha1_file(source)
                while chunk := proc.stdout.read(CHUNK):
                    packed_hash.update(chunk)
                    outp.write(chunk)
                outp.flush()
            code, err = ended.code, ended.err
    except FileNotFoundError as exc:
        out.unlink(missing_ok=True)
        if exc.filename == "fpack":
            raise PackError("fpack is not installed (apt-get install libcfitsio-bin)") from None
        raise
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if ended.expired:
        out.unlink(missing_ok=True)
        raise PackError(f"fpack took longer than {FPACK_TIMEOUT:g} s")
    if code != 0 or out.stat().st_size == 0:
        out.unlink(missing_ok=True)
        msg = " ".join(err.decode(errors="replace").split())[:300]
        raise PackError(f"fpack exited {code}: {msg}")
    try:
        if between is not None:
            between()
        verify_packed(source, out, layout)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Packed(out, packed_hash.hexdigest(), raw_sha1)


@contextlib.contextmanager
def _inherited(path: Path) -> Iterator[tuple[int, str]]:
    """``path`` opened for a child to inherit, and the name the child opens it by: only
    digits, which no CFITSIO syntax reads as anything but a file name. Opening
    ``/dev/fd/N`` gives the child a position of its own on the same inode."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd, f"/dev/fd/{fd}"
    finally:
        os.close(fd)


def _pipe_size() -> int:
    """The largest pipe an unprivileged process may ask for, up to 1 MiB: fewer, larger
    reads and writes between fpack or funpack and this process (with the default 64 KiB,
    a 50 MB stream costs some 800 wake-ups on each side)."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as fh:
            return min(1 << 20, int(fh.read()))
    except (OSError, ValueError):
        return -1  # the system's default


PIPE_SIZE = _pipe_size()


@dataclass
class _Ended:
    """How a child ended: its exit status, its standard error, and whether its deadline
    (FPACK_TIMEOUT) killed it."""

    code: int = 0
    err: bytes = b""
    expired: bool = False


# a hung read (NFS) must give the worker its thread back: the child is killed
_deadlines = Deadlines("pack-deadlines")


@contextlib.contextmanager
def _child(cmd: list[str], fd: int) -> Iterator[tuple[subprocess.Popen[bytes], _Ended]]:
    """Run ``cmd`` with ``fd`` inherited and its output on a pipe, under FPACK_TIMEOUT.
    On leaving, how it ended is filled in; if the caller raised, the child is killed
    first (it would block on a pipe nobody reads)."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(fd,),
        pipesize=PIPE_SIZE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    ended = _Ended()
    try:
        with _deadlines.watch(FPACK_TIMEOUT, proc.kill) as watch:
            try:
                yield proc, ended
            except BaseException:
                proc.kill()
                raise
            finally:
                ended.expired = bool(watch.fired)
    finally:
        proc.stdout.close()
        ended.err = proc.stderr.read()
        proc.stderr.close()
        ended.code = proc.wait()


def copy_to_spool(source: Path, spool: Path) -> Packed:
    """A private copy of an already packed source, so that the bytes hashed, uploaded
    and verified are one snapshot even if the source is rewritten meanwhile (hashed as
    it is copied: the raw file is the packed one)."""
    out = spool_name(spool)
    digest = hashlib.sha1(usedforsecurity=False)
    try:
        with open(source, "rb") as inp, open(out, "xb") as outp:
            while chunk := inp.read(CHUNK):
                digest.update(chunk)
                outp.write(chunk)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Packed(out, digest.hexdigest(), digest.hexdigest())


# Cards that must survive packing unchanged for the stored values to mean the same.
KEPT_CARDS = ("BITPIX", "NAXIS", "BZERO", "BSCALE", "BLANK", "PCOUNT", "GCOUNT")


def _read_header(stream: IO[bytes]) -> fits.Header | None:
    """The next HDU's header from a FITS stream; None at its end."""
    blocks: list[bytes] = []
    while True:
        block = stream.read(BLOCK)
        if not block:
            if blocks:
                raise PackError("funpack's output ends inside a header")
            return None
        if len(block) < BLOCK:
            raise PackError("funpack's output ends inside a header")
        blocks.append(block)
        if any(block[i : i + 8] == b"END     " for i in range(0, BLOCK, 80)):
            return fits.Header.fromstring(b"".join(blocks).decode("ascii"))


def _same_cards(i: int, a: fits.Header, b: fits.Header) -> None:
    naxis = int(a.get("NAXIS", 0))
    for card in (*KEPT_CARDS, *(f"NAXIS{k}" for k in range(1, naxis + 1))):
        if a.get(card) != b.get(card):
            raise PackError(
                f"HDU {i} {card} changed when packed: {a.get(card)!r} -> {b.get(card)!r}"
            )


def layout_of(original: Path) -> Layout:
    """Each HDU's header and where its data start, in file order."""
    try:
        with fits.open(original, do_not_scale_image_data=True, lazy_load_hdus=False) as hdul:
            return [(h.header.copy(), h.fileinfo()["datLoc"]) for h in hdul]
    except Exception as exc:
        raise PackError(f"original cannot be read again: {exc}") from None


def verify_packed(original: Path, packed: Path, layout: Layout | None = None) -> None:
    """Raise PackError unless unpacking ``packed`` gives exactly ``original``'s data.

    ``funpack`` decompresses the packed file into a stream (at C speed, in a process of
    its own); every HDU's data section is compared, byte for byte, with the original's,
    a block at a time, so memory stays bounded whatever the frame. funpack's exit status
    alone proves nothing (a corrupted ``.fz`` can unpack with exit 0): the bytes do.
    ``layout`` (from check, which has read the headers already) saves reading them again.
    """
    if layout is None:
        layout = layout_of(original)
    # funpack reads the packed file by a name of digits (see _inherited): from a file
    # it needs less memory and CPU than from standard input, which it copies whole
    try:
        with (
            _inherited(packed) as (fd, name),
            open(original, "rb") as orig,
            _child(["funpack", "-S", name], fd) as (proc, ended),
        ):
            assert proc.stdout is not None
            _compare_stream(proc.stdout, orig, layout)
    except PackError:
        if ended.expired:  # its output was cut short by the deadline: say so
            raise PackError(f"funpack took longer than {FPACK_TIMEOUT:g} s") from None
        raise
    if ended.expired:
        raise PackError(f"funpack took longer than {FPACK_TIMEOUT:g} s")
    if ended.code != 0:
        msg = " ".join(ended.err.decode(errors="replace").split())[:300]
        raise PackError(f"packed file does not decompress: funpack exited {ended.code}: {msg}")


def _compare_stream(stream: IO[bytes], orig: IO[bytes], layout: Layout) -> None:
    for i, (header, loc) in enumerate(layout):
        try:
            unpacked = _read_header(stream)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PackError(f"HDU {i} header does not unpack: {exc}") from None
        if unpacked is None:
            raise PackError(f"packed file has {i} HDUs, original {len(layout)}")
        _same_cards(i, header, unpacked)
        size = data_size(header)
        if data_size(unpacked) != size:
            raise PackError(f"HDU {i} data size changed when packed")
        orig.seek(loc)
        left = size
        while left > 0:
            n = min(CHUNK, left)
            if stream.read(n) != orig.read(n):
                raise PackError(f"HDU {i} data differ after unpacking")
            left -= n
        stream.read(-size % BLOCK)  # the padding
    if stream.read(1):
        raise PackError(f"packed file has more HDUs than the original's {len(layout)}")
