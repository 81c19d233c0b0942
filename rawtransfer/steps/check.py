"""check: FITS integrity, in-process with astropy.

Every HDU is parsed and verified, its data read, and CHECKSUM/DATASUM checked where the
file carries them. astropy reports many problems as warnings; here they are errors. A
subprocess per file (``fitscheck``) would cost half a second of interpreter start-up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from rawtransfer.errors import FileRejected


@dataclass(frozen=True)
class CheckResult:
    """What later steps need to know about a file that passed the check."""

    headers: tuple[fits.Header, ...]  # one per HDU, in file order
    float_images: bool  # some uncompressed image HDU holds floating-point pixels
    packed: bool  # some HDU is a tile-compressed image (the file is already a .fz)


_FILTER = ("error", None, AstropyUserWarning, None, 0)


def strict_astropy_warnings() -> None:
    """Make astropy's FITS warnings (checksum failures, truncation...) raise.

    ``warnings.catch_warnings`` is not thread-safe, so rather than toggling filters per
    call the filter is installed globally; checking membership first keeps it idempotent
    (pytest resets filters between tests, so this runs on every check).
    """
    if not any(f[0] == "error" and f[2] is AstropyUserWarning for f in warnings.filters):
        warnings.filterwarnings("error", category=AstropyUserWarning)


def check(path: Path) -> CheckResult:
    strict_astropy_warnings()
    headers: list[fits.Header] = []
    float_images = False
    packed = False
    try:
        # memory-mapped and unscaled: the stored integers are what the checksums cover,
        # and a 100 MB frame is not copied (or converted to float by BZERO) just to look
        with fits.open(
            path, checksum=True, memmap=True, do_not_scale_image_data=True, lazy_load_hdus=False
        ) as hdul:
            hdul.verify("exception")
            for hdu in hdul:
                data = hdu.data  # reads (and for compressed HDUs decompresses) the data
                if isinstance(hdu, fits.CompImageHDU):
                    packed = True
                elif (
                    hdu.is_image
                    and data is not None
                    and np.issubdtype(np.asarray(data).dtype, np.floating)
                    and int(hdu.header.get("BITPIX", 0)) < 0
                ):
                    float_images = True
                headers.append(hdu.header.copy())
    except FileRejected:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AstropyUserWarning) as exc:
        raise FileRejected(f"{_describe(exc)}") from None
    if not headers:
        raise FileRejected("no HDUs")
    return CheckResult(headers=tuple(headers), float_images=float_images, packed=packed)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "Checksum verification failed" in text or "Datasum verification failed" in text:
        return f"checksum mismatch ({text})"
    return text or type(exc).__name__
