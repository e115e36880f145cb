"""Storage helpers: how an output folder overlaps the inputs (the guard against data loss)."""

from __future__ import annotations

import os

import pytest

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.storage import overlap, refuse_overlap


def test_overlap_sees_equal_inside_and_containing_folders_in_every_spelling(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert overlap(str(data), str(data)) == "is"
    assert overlap(str(data) + "/", str(tmp_path / "x" / ".." / "data")) == "is"
    assert overlap(str(data / "out"), str(data)) == "is inside"
    assert overlap(str(tmp_path), str(data / "urls.csv")) == "contains"
    assert overlap(str(tmp_path / "data2"), str(data)) is None  # a shared prefix is not containment
    os.symlink(data, tmp_path / "link")
    assert overlap(str(tmp_path / "link" / "out"), str(data)) == "is inside"  # through a symlink
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert overlap("data", str(data)) == "is"  # relative against absolute
    finally:
        os.chdir(cwd)
    assert overlap("s3://bucket/work/", "s3://bucket/work") == "is"
    assert overlap("s3://bucket/work/detect", "s3://bucket/work") == "is inside"
    assert overlap("s3://bucket/work", "s3://bucket/work-old") is None
    assert overlap("s3://bucket/work", str(data)) is None


def test_refuse_overlap_names_both_folders_on_one_line(tmp_path):
    with pytest.raises(ConfigError) as refused:
        refuse_overlap(str(tmp_path / "in" / "out"), [str(tmp_path / "elsewhere"), str(tmp_path / "in")])
    message = str(refused.value)
    assert "\n" not in message and "is inside the input" in message and "nothing was written" in message
    refuse_overlap(str(tmp_path / "out"), [str(tmp_path / "in")])
