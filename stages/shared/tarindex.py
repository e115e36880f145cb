"""Megatron-Energon's ``NAME.tar.idx`` beside a tar: the byte offset of each sample's first header,
then of the end of the samples, as little-endian uint64 (what ``energon prepare`` writes). The
export and ``recaption --write shards`` know the offsets from writing the tar
(``SpooledTar.sample_offsets``)."""

from __future__ import annotations

import struct


def tar_index(offsets: list[int]) -> bytes:
    return struct.pack(f"<{len(offsets)}Q", *offsets)


def tar_index_name(tar_name: str) -> str:
    return tar_name.removesuffix(".tar") + ".tar.idx"
