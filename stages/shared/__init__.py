"""Helpers used by several stages: image normalising and decoding, JPEG parsing, missing values."""
