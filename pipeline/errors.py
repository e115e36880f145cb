"""Errors that reach users as one clear line instead of a traceback."""


class FacecapError(Exception):
    """A problem the user can fix (bad config, missing file, unreadable input).

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``.
    """

    exit_code = 2


class ConfigError(FacecapError):
    """A recipe or flag is wrong: unknown key, wrong type, missing file."""


class InputError(FacecapError):
    """An input file or dataset cannot be read as asked."""


class DatasetError(FacecapError):
    """An output folder holds something the command must not overwrite or cannot use."""


class StorageFull(FacecapError):
    """The output storage ran out of space (or quota): every further shard would fail too."""

    exit_code = 3


# How a worker's error text says the disk or quota is full (errno 28 ENOSPC, 122 EDQUOT).
FULL_MARKERS = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")


def storage_full(error: str | None) -> bool:
    return bool(error) and any(marker in error for marker in FULL_MARKERS)
