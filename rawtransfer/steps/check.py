"""check: FITS integrity, in-process with astropy.

Every HDU is parsed and verified, its data read, and CHECKSUM/DATASUM checked where the
file carries them. astropy reports many problems as warnings; here they are errors. A
subprocess per file (``fitscheck``) would cost half a second of interpreter start-up.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.utils.exceptions import AstropyUserWarning

from rawtransfer.errors import FileRejected, FrameTooLarge
from rawtransfer.steps.settle import data_size


@dataclass(frozen=True)
class CheckResult:
    """What later steps need to know about a file that passed the check."""

    headers: tuple[fits.Header, ...]  # one per HDU, in file order
    float_images: bool  # some uncompressed image HDU holds floating-point pixels
    packed: bool  # some HDU is a tile-compressed image (the file is already a .fz)
    offsets: tuple[int, ...] = ()  # where each HDU's data start in the file

    @property
    def layout(self) -> list[tuple[fits.Header, int]]:
        """Each HDU's header and data offset: what the lossless proof compares against
        (handed on, so that the proof does not parse the headers a second time)."""
        return list(zip(self.headers, self.offsets, strict=True))


_FILTER = ("error", None, AstropyUserWarning, None, 0)


def strict_astropy_warnings() -> None:
    """Make astropy's FITS warnings (checksum failures, truncation...) raise.

    ``warnings.catch_warnings`` is not thread-safe, so rather than toggling filters per
    call the filter is installed globally; checking membership first keeps it idempotent
    (pytest resets filters between tests, so this runs on every check).
    """
    if not any(f[0] == "error" and f[2] is AstropyUserWarning for f in warnings.filters):
        warnings.filterwarnings("error", category=AstropyUserWarning)


# No bound unless the caller gives one (the service passes --max-frame-bytes).
UNBOUNDED = 1 << 62


def check(path: Path, max_bytes: int = UNBOUNDED) -> CheckResult:
    """Verify every HDU; refuse, before decompressing anything, an HDU whose data would
    take more than ``max_bytes`` in memory."""
    strict_astropy_warnings()
    headers: list[fits.Header] = []
    offsets: list[int] = []
    float_images = False
    packed = False
    try:
        # memory-mapped and unscaled: the stored integers are what the checksums cover,
        # and a 100 MB frame is not copied (or converted to float by BZERO) just to look
        with fits.open(
            path, checksum=True, memmap=True, do_not_scale_image_data=True, lazy_load_hdus=False
        ) as hdul:
            hdul.verify("exception")
            for i, hdu in enumerate(hdul):
                declared = data_size(hdu.header)
                if declared > max_bytes:
                    raise FrameTooLarge(
                        f"HDU {i} declares {declared} bytes of data, more than "
                        f"--max-frame-bytes {max_bytes}"
                    )
                if isinstance(hdu, fits.CompImageHDU):
                    # decompress every tile, a block of rows at a time: memory stays
                    # bounded whatever the image's size
                    for _block in row_blocks(hdu):
                        pass
                    packed = True
                    data = None
                else:
                    data = hdu.data  # memory-mapped: reading it costs no copy
                if (
                    data is not None
                    and hdu.is_image
                    and np.issubdtype(np.asarray(data).dtype, np.floating)
                    and int(hdu.header.get("BITPIX", 0)) < 0
                ):
                    float_images = True
                headers.append(hdu.header.copy())
                offsets.append(hdu.fileinfo()["datLoc"])
    except FileRejected:
        raise
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AstropyUserWarning,
        VerifyError,
    ) as exc:
        raise FileRejected(f"{_describe(exc)}") from None
    if not headers:
        raise FileRejected("no HDUs")
    return CheckResult(
        headers=tuple(headers),
        float_images=float_images,
        packed=packed,
        offsets=tuple(offsets),
    )


# A .fz source is decompressed (to check it) a block of rows at a time, of about this
# many bytes: astropy's sections decompress only the tiles of the rows asked for, so
# memory does not grow with the frame.
BLOCK_BYTES = 8 << 20


def row_blocks(hdu: fits.hdu.base._BaseHDU) -> Iterator[np.ndarray]:
    """The HDU's stored values (unscaled), in blocks along the slowest axis."""
    shape = tuple(hdu.shape)
    if not shape:
        return
    per_row = max(1, abs(int(hdu.header["BITPIX"])) // 8 * int(np.prod(shape[1:])))
    step = max(1, BLOCK_BYTES // per_row)
    for start in range(0, shape[0], step):
        yield hdu.section[start : start + step]


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "Checksum verification failed" in text or "Datasum verification failed" in text:
        return f"checksum mismatch ({text})"
    return text or type(exc).__name__
