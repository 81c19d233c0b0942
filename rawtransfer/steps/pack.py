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

import logging
import subprocess
import uuid
from pathlib import Path

import numpy as np
from astropy.io import fits

from rawtransfer.destination.base import TMP_SUFFIX
from rawtransfer.errors import PackError

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


def clean_spool(spool: Path) -> int:
    """Remove temporary files left by a previous run that was killed mid-pack."""
    removed = 0
    for p in spool.glob(f".*{TMP_SUFFIX}"):
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def pack(source: Path, spool: Path, *, float_images: bool) -> Path:
    """fpack ``source`` into a new file in ``spool``, verify it, return its path.

    The file goes to fpack on standard input and comes back on standard output: CFITSIO
    reads file *names* with its extended syntax (``x.fits[1]``, ``$VAR``, ``(out)``...),
    so a camera's file name must never reach it.
    """
    out = spool_name(spool)
    cmd = [*fpack_args(float_images), "-S", "-"]
    try:
        with open(source, "rb") as inp, open(out, "xb") as outp:
            proc = subprocess.run(
                cmd,
                stdin=inp,
                stdout=outp,
                stderr=subprocess.PIPE,
                timeout=FPACK_TIMEOUT,
                check=False,
            )
    except subprocess.TimeoutExpired:
        out.unlink(missing_ok=True)
        raise PackError(f"fpack took longer than {FPACK_TIMEOUT:.0f} s") from None
    except FileNotFoundError as exc:
        out.unlink(missing_ok=True)
        if exc.filename == "fpack" or not Path(source).exists():
            raise PackError("fpack is not installed (apt-get install libcfitsio-bin)") from None
        raise
    if proc.returncode != 0 or out.stat().st_size == 0:
        out.unlink(missing_ok=True)
        msg = " ".join(proc.stderr.decode(errors="replace").split())[:300]
        raise PackError(f"fpack exited {proc.returncode}: {msg}")
    try:
        verify_packed(source, out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _data_hdus(hdul: fits.HDUList) -> list[fits.hdu.base._BaseHDU]:
    return [
        h for h in hdul if int(h.header.get("NAXIS", 0)) > 0 or isinstance(h, fits.CompImageHDU)
    ]


def _image_bytes(hdu: fits.hdu.base._BaseHDU) -> tuple[str, bytes]:
    """Stored pixel values as big-endian bytes (BZERO/BSCALE not applied)."""
    arr = np.asarray(hdu.data)
    be = arr.astype(arr.dtype.newbyteorder(">"), copy=False)
    return str(be.dtype), be.tobytes()


def _raw_data(path: Path, hdu: fits.hdu.base._BaseHDU) -> bytes:
    info = hdu.fileinfo()
    with open(path, "rb") as fh:
        fh.seek(info["datLoc"])
        return fh.read(info["datSpan"])


def verify_packed(original: Path, packed: Path) -> None:
    """Raise PackError unless every HDU of ``packed`` holds exactly ``original``'s data."""
    try:
        with (
            fits.open(original, do_not_scale_image_data=True, memmap=True) as a,
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
                    if _image_bytes(x) != _image_bytes(y):
                        raise PackError(f"HDU {i} pixels differ after unpacking")
                elif _raw_data(original, x) != _raw_data(packed, y):
                    raise PackError(f"HDU {i} table data differ when packed")
    except PackError:
        raise
    except Exception as exc:  # anything astropy raises means the .fz is not usable
        raise PackError(f"packed file does not decompress: {exc}") from None
