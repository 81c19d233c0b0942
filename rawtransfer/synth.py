"""Realistic synthetic raw frames, for the demo, the tests and the benchmarks.

A raw CCD frame as cameras write it: 16-bit unsigned pixels stored as signed integers
with BZERO=32768, a sky background with Poisson-like noise, a few stars, a bias level,
DATE-OBS and the usual cards, optionally CHECKSUM/DATASUM.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from astropy.io import fits


def raw_frame(
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int = 0,
    date_obs: str = "2026-11-24T23:14:05.123",
    stars: int = 12,
    extra: dict[str, object] | None = None,
) -> fits.PrimaryHDU:
    rng = np.random.default_rng(seed)
    sky = 1000.0 + 200.0 * rng.random()
    img = rng.normal(sky, np.sqrt(sky), size=shape)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for _ in range(stars):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        flux, sigma = rng.uniform(2e3, 5e4), rng.uniform(1.2, 2.5)
        img += flux * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    data = np.clip(img, 0, 65535).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)  # astropy stores uint16 as int16 with BZERO=32768
    h = hdu.header
    h["DATE-OBS"] = (date_obs, "UTC start of exposure")
    h["EXPTIME"] = (60.0, "[s]")
    h["IMAGETYP"] = "LIGHT"
    h["INSTRUME"] = "SYNTHCAM"
    h["GAIN"] = 1.4
    for k, v in (extra or {}).items():
        h[k] = v
    return hdu


def write_frame(
    path: Path,
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int = 0,
    date_obs: str = "2026-11-24T23:14:05.123",
    checksum: bool = True,
    extra: dict[str, object] | None = None,
) -> Path:
    hdu = raw_frame(shape, seed=seed, date_obs=date_obs, extra=extra)
    fits.HDUList([hdu]).writeto(path, checksum=checksum, overwrite=False)
    return path


def write_float_frame(
    path: Path,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    date_obs: str = "2026-11-24T22:00:00",
) -> Path:
    rng = np.random.default_rng(seed)
    hdu = fits.PrimaryHDU(rng.normal(0.0, 1.0, shape).astype(np.float32))
    hdu.header["DATE-OBS"] = date_obs
    hdu.writeto(path, checksum=True)
    return path


def write_multi_hdu(path: Path, seed: int = 0, date_obs: str = "2026-11-24T21:00:00") -> Path:
    """A primary with no data, two image extensions and a binary table."""
    primary = fits.PrimaryHDU()
    primary.header["DATE-OBS"] = date_obs
    a = fits.ImageHDU(raw_frame((128, 160), seed=seed).data, name="CCD1")
    b = fits.ImageHDU(raw_frame((128, 160), seed=seed + 1).data, name="CCD2")
    cols = fits.ColDefs(
        [
            fits.Column(name="x", format="D", array=np.arange(10.0)),
            fits.Column(name="flag", format="J", array=np.arange(10)),
            fits.Column(name="name", format="8A", array=np.array([f"s{i}" for i in range(10)])),
        ]
    )
    t = fits.BinTableHDU.from_columns(cols, name="CATALOG")
    fits.HDUList([primary, a, b, t]).writeto(path, checksum=True)
    return path


def night(
    directory: Path, count: int, shape: tuple[int, int] = (512, 512), start: datetime | None = None
) -> list[Path]:
    """``count`` frames named like the upstream cameras' (t1_r12345_ut2.fits)."""
    start = start or datetime(2026, 11, 24, 22, 0, 0)
    out = []
    for i in range(count):
        t = start.replace(minute=(start.minute + i) % 60)
        name = f"t{1 + i % 2}_r{10000 + i}_ut{1 + i % 4}.fits"
        out.append(
            write_frame(
                directory / name, shape, seed=i, date_obs=t.isoformat(timespec="milliseconds")
            )
        )
    return out
