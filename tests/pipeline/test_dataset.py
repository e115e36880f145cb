"""The dataset format's building blocks: spooled tars, tar readers, done markers."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from facecap.pipeline.dataset import SpooledTar, TarShardReader, tar_member_pieces
from facecap.pipeline.storage import Storage


def test_spooled_tar_is_byte_identical_to_tarfile_and_sorted(tmp_path):
    members = {
        "k2": {"jpg": b"x" * 1000, "json": b"{}"},
        "k0": {"jpg": b"y" * 513},
        "k1": {"webp": b""},
        "k\u00e9": {"png": b"z" * 512},  # a non-ASCII name
        "d" * 60 + "/" + "e" * 50: {"jpg": b"w"},  # over ustar's 100 characters: split into a prefix
    }
    spool = SpooledTar()
    for key, media in members.items():  # out of order, as a yielding stage finishes rows
        spool.add(key, media)
    written = io.BytesIO()
    digest = spool.write_sorted(written)
    spool.close()
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key in sorted(members):
            for ext in sorted(members[key]):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[key][ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[key][ext]))
    assert written.getvalue() == expected.getvalue()
    assert digest.size == len(written.getvalue())
    path = tmp_path / "part-00000.tar"
    path.write_bytes(written.getvalue())
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(members)
    assert samples[3]["jpg"] == b"x" * 1000


def test_empty_spool_writes_a_valid_empty_tar():
    spool = SpooledTar()
    out = io.BytesIO()
    spool.write_sorted(out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert tar.getnames() == []


def test_tar_reader_survives_truncation(tmp_path):
    spool = SpooledTar()
    for i in range(5):
        spool.add(f"k{i}", {"jpg": bytes([i]) * 2000})
    out = io.BytesIO()
    spool.write_sorted(out)
    (tmp_path / "part-00000.tar").write_bytes(out.getvalue()[:6000])
    with TarShardReader(Storage(str(tmp_path)), "part-00000.tar") as reader:
        assert reader.error
        assert reader.get("k0") == {"jpg": bytes([0]) * 2000}
        assert reader.get("k4") is None
    with TarShardReader(Storage(str(tmp_path)), "absent.tar") as reader:
        assert "missing tar" in reader.error and reader.get("k0") is None


@pytest.mark.parametrize("key", ["../../evil", "/abs/path", "a/../../b", "a\\b", "C:x", "a//b", "x\x00y", ""])
def test_every_tar_writer_refuses_member_names_that_escape_the_folder(key):
    spool = SpooledTar()
    with pytest.raises(ValueError, match="refusing tar member key"):
        spool.add(key, {"jpg": b"x"})
    with pytest.raises(ValueError, match="refusing tar member"):
        tar_member_pieces(f"{key}.jpg", b"x")
    spool.add("a/b_f0", {"square.jpg": b"x"})  # a folder in a key is fine (WebDataset allows it)
    assert len(spool) == 1
    spool.close()
