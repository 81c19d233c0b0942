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

import numpy as np
from astropy.io import fits

from rawtransfer.destination.base import CHUNK, TMP_SUFFIX
from rawtransfer.errors import PackError
from rawtransfer.steps.check import row_blocks

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


def _data_hdus(hdul: fits.HDUList) -> list[fits.hdu.base._BaseHDU]:
    return [
        h for h in hdul if int(h.header.get("NAXIS", 0)) > 0 or isinstance(h, fits.CompImageHDU)
    ]


def _big_endian(a: np.ndarray) -> np.ndarray:
    """The stored values as big-endian bytes, bit for bit (NaN payloads included)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder(">")).view(np.uint8)


def _same_pixels(x: fits.hdu.base._BaseHDU, y: fits.hdu.base._BaseHDU) -> bool:
    if tuple(y.shape) != tuple(x.shape):
        return False
    for a, b in zip(row_blocks(x), row_blocks(y), strict=True):
        if a.dtype.itemsize != b.dtype.itemsize or a.dtype.kind != b.dtype.kind:
            return False
        if not np.array_equal(_big_endian(a), _big_endian(b)):
            return False
    return True


def _same_bytes(pa: Path, x: fits.hdu.base._BaseHDU, pb: Path, y: fits.hdu.base._BaseHDU) -> bool:
    ia, ib = x.fileinfo(), y.fileinfo()
    if ia["datSpan"] != ib["datSpan"]:
        return False
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        fa.seek(ia["datLoc"])
        fb.seek(ib["datLoc"])
        left = ia["datSpan"]
        while left > 0:
            n = min(CHUNK, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def verify_packed(original: Path, packed: Path) -> None:
    """Raise PackError unless every HDU of ``packed`` holds exactly ``original``'s data.

    Compared block by block of rows through astropy's sections, so the proof's memory is
    bounded by check.BLOCK_BYTES whatever the frame's size (a tile-compressed HDU decompresses
    only the tiles of the rows asked for)."""
    try:
        with (
            fits.open(original, do_not_scale_image_data=True, memmap=False) as a,
            fits.open(packed, do_not_scale_image_data=True, memmap=False) as b,
        ):
            ha, hb = _data_hdus(a), _data_hdus(b)
            if len(ha) != len(hb):
                raise PackError(f"packed file has {len(hb)} data HDUs, original {len(ha)}")
            for i, (x, y) in enumerate(zip(ha, hb, strict=True)):
                if x.is_image:
                    if not (y.is_image or isinstance(y, fits.CompImageHDU)):
                        raise PackError(f"HDU {i} changed kind when packed")
                    for card in ("BZERO", "BSCALE", "BLANK"):
                        if x.header.get(card) != y.header.get(card):
                            raise PackError(f"HDU {i} {card} changed when packed")
                    if not _same_pixels(x, y):
                        raise PackError(f"HDU {i} pixels differ after unpacking")
                elif not _same_bytes(original, x, packed, y):
                    raise PackError(f"HDU {i} table data differ when packed")
    except PackError:
        raise
    except Exception as exc:  # anything astropy raises means the .fz is not usable
        raise PackError(f"packed file does not decompress: {exc}") from None
