"""Reading CelebA for ``facecap tag train``: the public release's folder, or the same as Parquet.

**Folder** (the release as downloaded, "Align&Cropped Images"):

- ``img_align_celeba/``: the 178x218 aligned JPEGs (``000001.jpg`` ...);
- ``list_attr_celeba.txt``: line 1 the image count, line 2 the 40 attribute names, then one line
  per image: ``FILE v1 ... v40`` with ``1`` (has it) or ``-1``;
- ``list_eval_partition.txt``: ``FILE 0|1|2`` (train, val, test).

**Parquet** (a file, or a folder of ``*.parquet`` read in name order), one row per image:

- ``image``: binary, the encoded image (JPEG or PNG, as in ``img_align_celeba/``);
- ``file``: string, the image's name (``000001.jpg``), for messages and the model card;
- ``partition``: integer, 0 train, 1 val, 2 test (as in ``list_eval_partition.txt``);
- one integer column per CelebA attribute, named as in ``list_attr_celeba.txt`` (``Male``, ...),
  ``1``/``-1`` as in the release (``1``/``0`` is read the same: above 0 is "has it").

Images are read lazily, by index, so a 200,000-image release costs only its label table in memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facecap.pipeline.errors import FacecapError
from facecap.stages.tag.schema import CELEBA40

SPLITS = ("train", "val", "test")
LAYOUT = (
    "expected CelebA's layout (img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt) "
    "or Parquet with columns image, file, partition and the 40 attributes"
)


class CelebaDataError(FacecapError):
    """The training data is not CelebA as ``facecap tag train`` reads it."""


@dataclass
class CelebaSplit:
    """One partition: image names, labels [N, 40] in ``CELEBA40`` order (0/1), and a reader."""

    name: str
    files: list[str]
    labels: np.ndarray
    source: CelebaSource

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> np.ndarray:
        """The BGR image at ``index`` (of this split)."""
        return self.source.image(self.files[index])


class CelebaSource(ABC):
    """Where the images are: a folder of files or Parquet rows."""

    description: str

    @abstractmethod
    def image(self, file: str) -> np.ndarray:
        """The BGR image of one file name of the release."""


class FolderImages(CelebaSource):
    def __init__(self, root: Path):
        self.root = root
        self.description = f"CelebA folder {root.parent}"

    def image(self, file: str) -> np.ndarray:
        image = cv2.imread(str(self.root / file), cv2.IMREAD_COLOR)
        if image is None:
            raise CelebaDataError(f"{self.root / file}: missing or not an image")
        return image


class ParquetImages(CelebaSource):
    """Image bytes kept from the Parquet files (encoded, so about the size of the JPEGs)."""

    def __init__(self, path: Path, images: dict[str, bytes]):
        self.images = images
        self.description = f"CelebA Parquet {path}"

    def image(self, file: str) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(self.images[file], np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise CelebaDataError(f"{file}: the image bytes in the Parquet do not decode")
        return image


def open_celeba(path: Path, limit: int | None = None) -> dict[str, CelebaSplit]:
    """The three splits of the CelebA release at ``path`` (each cut to its first ``limit`` images)."""
    path = Path(path).expanduser()
    if (path.is_file() and path.suffix == ".parquet") or (
        path.is_dir() and not (path / "list_attr_celeba.txt").exists()
    ):
        parquets = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        if parquets:
            return _from_parquet(path, parquets, limit)
    if not path.exists():
        raise CelebaDataError(f"{path}: no such file or folder; {LAYOUT}")
    if not path.is_dir():
        raise CelebaDataError(f"{path}: not a folder or a .parquet file; {LAYOUT}")
    for needed in ("list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"):
        if not (path / needed).exists():
            raise CelebaDataError(f"{path}: missing {needed}; {LAYOUT}")
    names, labels = read_attributes(path / "list_attr_celeba.txt")
    partition = read_partition(path / "list_eval_partition.txt")
    unknown = [f for f in labels if f not in partition]
    if unknown:
        raise CelebaDataError(f"{path}: {len(unknown)} images have no partition, e.g. {unknown[0]}")
    source = FolderImages(path / "img_align_celeba")
    return _splits(names, list(labels), np.stack(list(labels.values())), [partition[f] for f in labels], source, limit)


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """``list_attr_celeba.txt``: (attribute names as in the file, file -> values as in the file)."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise CelebaDataError(f"{path}: expected a count line, the 40 names, then one line per image")
    names = lines[1].split()
    _check_names(path, names)
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise CelebaDataError(f"{path}:{number}: expected a file name and {len(names)} values, got {len(parts)}")
        try:
            rows[parts[0]] = np.array([int(v) for v in parts[1:]], np.int8)
        except ValueError:
            raise CelebaDataError(f"{path}:{number}: values must be 1 or -1") from None
    if not rows:
        raise CelebaDataError(f"{path}: no image lines")
    return names, rows


def read_partition(path: Path) -> dict[str, int]:
    partition = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise CelebaDataError(f"{path}:{number}: expected 'FILE 0|1|2', got {line.strip()!r}")
        partition[parts[0]] = int(parts[1])
    return partition


def _check_names(where: Path, names: list[str]) -> None:
    missing = sorted(set(CELEBA40) - set(names))
    if missing:
        raise CelebaDataError(f"{where}: not CelebA's 40 attributes (missing {', '.join(missing[:5])})")


def _from_parquet(path: Path, files: list[Path], limit: int | None) -> dict[str, CelebaSplit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file))
        except (OSError, pa.ArrowInvalid) as exc:
            raise CelebaDataError(f"{file}: cannot read as Parquet ({exc})") from None
    table = pa.concat_tables(tables, promote_options="default")
    missing = [c for c in ("image", "file", "partition") if c not in table.column_names]
    if missing:
        raise CelebaDataError(f"{path}: Parquet without column(s) {', '.join(missing)}; {LAYOUT}")
    _check_names(path, table.column_names)
    names = list(CELEBA40)
    labels = np.stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.int8) for n in names], axis=1)
    file_names = [str(f) for f in table.column("file").to_pylist()]
    partitions = [int(p) for p in table.column("partition").to_pylist()]
    if set(partitions) - {0, 1, 2}:
        raise CelebaDataError(f"{path}: partition must be 0 (train), 1 (val) or 2 (test)")
    images = dict(zip(file_names, table.column("image").to_pylist(), strict=True))
    return _splits(names, file_names, labels, partitions, ParquetImages(path, images), limit)


def _splits(
    names: list[str],
    files: list[str],
    values: np.ndarray,
    partitions: list[int],
    source: CelebaSource,
    limit: int | None,
) -> dict[str, CelebaSplit]:
    order = [names.index(a) for a in CELEBA40]
    labels = (values[:, order] > 0).astype(np.float32)
    partitions_array = np.asarray(partitions)
    splits = {}
    for number, split in enumerate(SPLITS):
        chosen = np.flatnonzero(partitions_array == number)[:limit]
        if not len(chosen):
            raise CelebaDataError(f"{source.description}: the {split} partition ({number}) is empty")
        splits[split] = CelebaSplit(split, [files[i] for i in chosen], labels[chosen], source)
    return splits
