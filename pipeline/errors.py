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
