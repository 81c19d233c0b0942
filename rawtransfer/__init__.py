"""rawtransfer: move raw FITS frames from a telescope host into a data-centre archive.

Each frame is checked, packed losslessly with fpack, claimed by its SHA1 in a catalog,
copied to a ``YYYY/MM/DD`` tree at the destination and verified there before it counts.
"""

__version__ = "0.1.0"
