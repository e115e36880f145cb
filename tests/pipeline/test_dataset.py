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


def _tarfile_index(path) -> dict:
    index = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                stem, _, ext = member.name.rpartition("/")[2].partition(".")
                folder = member.name.rpartition("/")[0]
                index.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = (member.offset_data, member.size)
    return index


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_header_index_agrees_with_tarfile(tmp_path, tar_format):
    # Plain ustar goes through the fast path; long names (GNU/PAX extension headers) through tarfile.
    path = tmp_path / "mixed.tar"
    long_name = "d" * 90 + "/" + "k" * 60 + ".jpg"  # over 100 bytes: ustar splits it into prefix + name
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in [("a.jpg", b"x" * 700), ("a.json", b"{}"), ("sub/b.txt", b""), (long_name, b"y" * 513)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("sub/")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    with TarShardReader(Storage(str(tmp_path)), "mixed.tar") as reader:
        assert reader._index == _tarfile_index(path) and reader.error is None
        assert reader.get("a", ["jpg"]) == {"jpg": b"x" * 700}
        assert reader.get("d" * 90 + "/" + "k" * 60, ["jpg"]) == {"jpg": b"y" * 513}


def test_a_damaged_header_falls_back_to_tarfile_which_keeps_what_came_before(tmp_path):
    spool = SpooledTar()
    for key in ("k0", "k1", "k2"):
        spool.add(key, {"jpg": key.encode() * 300})
    with open(tmp_path / "part-00000.tar", "wb") as out:
        spool.write_sorted(out)
    data = bytearray((tmp_path / "part-00000.tar").read_bytes())
    second = 512 + 1024  # k0's header and its 600 bytes padded to 1,024
    data[second + 10] ^= 0xFF  # k1's name: its checksum no longer matches
    (tmp_path / "part-00000.tar").write_bytes(bytes(data))
    with TarShardReader(Storage(str(tmp_path)), "part-00000.tar") as reader:
        # What tarfile makes of it (it ends the archive at a bad header after the first).
        assert reader.stored_keys() == ["k0"] and reader._index == _tarfile_index(tmp_path / "part-00000.tar")
