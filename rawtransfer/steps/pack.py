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
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from astropy.io import fits

from rawtransfer.destination.base import CHUNK, TMP_SUFFIX
from rawtransfer.errors import PackError
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


@dataclass(frozen=True)
class Packed:
    """A packed file in the spool, its SHA1, and the SHA1 of the raw bytes it came from
    (both computed as the bytes went by: the raw file is read once for its hash and for
    fpack, and the packed one is never read again to be hashed)."""

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
) -> Packed:
    """fpack ``source`` into a new file in ``spool``, verify it, return it with hashes.

    The file goes to fpack on standard input and comes back on standard output: CFITSIO
    reads file *names* with its extended syntax (``x.fits[1]``, ``$VAR``, ``(out)``...),
    so a camera's file name must never reach it. Both ends are this process's: the raw
    bytes are hashed as they are fed to fpack (one read instead of two), the packed bytes
    as they arrive; and the output is written here, not by fpack, because fpack exits 0
    even when its output could not be written (a full spool), whereas here the write
    fails with ENOSPC and says so. ``between`` runs after packing and before the proof
    (a fault point).
    """
    out = spool_name(spool)
    cmd = [*fpack_args(float_images), "-S", "-"]
    raw_hash = hashlib.sha1(usedforsecurity=False)
    packed_hash = hashlib.sha1(usedforsecurity=False)
    feed_error: list[BaseException] = []
    try:
        with open(source, "rb") as inp, open(out, "xb") as outp:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            stdin = proc.stdin

            def feed() -> None:
                try:
                    while chunk := inp.read(CHUNK):
                        raw_hash.update(chunk)
                        stdin.write(chunk)
                except BrokenPipeError:
                    pass  # fpack stopped reading: its exit status says why
                except BaseException as exc:  # handed to the caller
                    feed_error.append(exc)
                finally:
                    with contextlib.suppress(OSError):
                        stdin.close()

            feeder = threading.Thread(target=feed, name="fpack-feed", daemon=True)
            feeder.start()
            # a hung read (NFS) must give the worker its thread back
            timed_out = threading.Event()

            def _kill() -> None:
                timed_out.set()
                proc.kill()

            timer = threading.Timer(FPACK_TIMEOUT, _kill)
            timer.start()
            try:
                while chunk := proc.stdout.read(CHUNK):
                    packed_hash.update(chunk)
                    outp.write(chunk)
                outp.flush()
            except BaseException:
                proc.kill()  # it would block on a pipe nobody reads any more
                raise
            finally:
                timer.cancel()
                proc.stdout.close()
                err = proc.stderr.read()
                proc.stderr.close()
                code = proc.wait()
                feeder.join()
        if feed_error:
            raise feed_error[0]
    except FileNotFoundError as exc:
        out.unlink(missing_ok=True)
        if exc.filename == "fpack":
            raise PackError("fpack is not installed (apt-get install libcfitsio-bin)") from None
        raise
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if timed_out.is_set():
        out.unlink(missing_ok=True)
        raise PackError(f"fpack took longer than {FPACK_TIMEOUT:.0f} s")
    if code != 0 or out.stat().st_size == 0:
        out.unlink(missing_ok=True)
        msg = " ".join(err.decode(errors="replace").split())[:300]
        raise PackError(f"fpack exited {code}: {msg}")
    try:
        if between is not None:
            between()
        verify_packed(source, out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Packed(out, packed_hash.hexdigest(), raw_hash.hexdigest())


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


def verify_packed(original: Path, packed: Path) -> None:
    """Raise PackError unless unpacking ``packed`` gives exactly ``original``'s data.

    ``funpack`` decompresses the packed file into a stream (at C speed, in a process of
    its own); every HDU's data section is compared, byte for byte, with the original's,
    a block at a time, so memory stays bounded whatever the frame. funpack's exit status
    alone proves nothing (a corrupted ``.fz`` can unpack with exit 0): the bytes do.
    """
    try:
        with fits.open(original, do_not_scale_image_data=True, lazy_load_hdus=False) as hdul:
            layout = [(h.header.copy(), h.fileinfo()["datLoc"]) for h in hdul]
    except Exception as exc:
        raise PackError(f"original cannot be read again: {exc}") from None
    with open(packed, "rb") as inp, open(original, "rb") as orig:
        proc = subprocess.Popen(
            ["funpack", "-S", "-"], stdin=inp, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        timer = threading.Timer(FPACK_TIMEOUT, proc.kill)
        timer.start()
        try:
            _compare_stream(proc.stdout, orig, layout)
        except BaseException:
            proc.kill()
            raise
        finally:
            timer.cancel()
            proc.stdout.close()
            err = proc.stderr.read()
            proc.stderr.close()
            code = proc.wait()
    if code != 0:
        msg = " ".join(err.decode(errors="replace").split())[:300]
        raise PackError(f"packed file does not decompress: funpack exited {code}: {msg}")


def _compare_stream(
    stream: IO[bytes], orig: IO[bytes], layout: list[tuple[fits.Header, int]]
) -> None:
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
