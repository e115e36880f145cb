"""``facecap dedup``: its flags and examples (the command itself is built by the CLI root)."""

from facecap.pipeline.options import Flag, StageCommand

COMMANDS = (
    StageCommand(
        stage="dedup",
        summary="IN: face rows (after detect, quality, tag or caption); OUT: the same rows, duplicates marked "
        "dedup:exact / near_duplicate / identity_cap / eval_overlap with duplicate_of.",
        input_help="face dataset",
        flags=(
            Flag("kinds", help="comma-separated: exact, near, embedding, identity"),
            Flag("against", is_path=True, help="folder of eval images (or a dataset's tars) to decontaminate"),
            Flag("identity_cap", help="keep at most this many faces per identity"),
        ),
        examples=(
            "facecap dedup work/caption work/dedup (exact, perceptual and same-face duplicates)",
            "facecap dedup work/caption work/dedup --against eval-images/ (also drop anything close to a held-out "
            "eval set)",
            "facecap dedup work/caption work/dedup --kinds exact,near,embedding,identity --identity-cap 50",
        ),
    ),
)
