"""The status column: ``ok`` or ``<stage>:<reason>``, one per row, never dropped."""

OK = "ok"


def rejected(stage: str, reason: str) -> str:
    return f"{stage}:{reason}"


def stage_of(status: str) -> str | None:
    """The stage that rejected a row, or None for ``ok``."""
    return None if status == OK else status.partition(":")[0]
