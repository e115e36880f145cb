"""Fingerprints for dedup: exact digests, a 64-bit DCT perceptual hash, face embeddings.

The face embedder lives in stages/shared/identity.py (export embeds faces too); it is imported here
under its old name.

Exact digests are folded to signed 64-bit integers (the first 8 bytes of a sha256): compact in
memory and Parquet, with a collision chance of about n^2 / 2^65 (1e-7 for a million images).
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from facecap.stages.shared.identity import FaceEmbedder

__all__ = ["FaceEmbedder", "digest64", "hamming", "hex_to_int64", "normalised_url", "phash", "pixel_digest"]

HASH_SIDE = 32  # pHash: DCT of a 32x32 grey image, keep the 8x8 lowest frequencies


def digest64(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big", signed=True)


def hex_to_int64(sha256_hex: str) -> int:
    return int.from_bytes(bytes.fromhex(sha256_hex[:16]), "big", signed=True)


def pixel_digest(pixels: np.ndarray) -> int:
    """The same pixels re-encoded (PNG vs JPEG of a decoded JPEG, metadata stripped) digest alike."""
    return digest64(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode())


def normalised_url(url: str) -> str:
    """Scheme and host lower-cased, default port, fragment and trailing slash dropped."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    port = parts.port
    if port and not ((parts.scheme == "http" and port == 80) or (parts.scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/") or "/", parts.query, ""))


def phash(pixels: np.ndarray) -> int:
    """64-bit DCT perceptual hash (as a signed int64): bit set where a low frequency is above the median.

    Robust to resizing, re-encoding and mild crops or colour changes (a few bits change); not to
    rotation or mirroring.
    """
    grey = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64))
