"""``facecap dedup``: its flags and examples (the command itself is built by the CLI root); and
``facecap optout``, which keeps the opt-out list file."""

from __future__ import annotations

from typing import Annotated

import typer

from facecap.pipeline.options import Flag, StageCommand

COMMANDS = (
    StageCommand(
        stage="dedup",
        summary="IN: face rows (after detect, quality, tag or caption); OUT: the same rows, duplicates marked "
        "dedup:exact / near_duplicate / identity_cap / eval_overlap with duplicate_of, opted-out and eval "
        "identities dedup:opted_out_identity / eval_identity.",
        input_help="face dataset",
        flags=(
            Flag("kinds", help="comma-separated: exact, near, embedding, identity"),
            Flag("against", is_path=True, help="folder of eval images (or a dataset's tars) to decontaminate"),
            Flag("identity_cap", help="keep at most this many faces per identity"),
            Flag(
                "opt_out_faces",
                is_path=True,
                help="photos of people who opted out (a subfolder per person, or one photo per file): "
                "their faces get dedup:opted_out_identity",
            ),
            Flag(
                "opt_out_embeddings",
                is_path=True,
                help="an opt-out list file (facecap optout add): its people's faces get dedup:opted_out_identity",
            ),
            Flag(
                "against_identities",
                is_path=True,
                help="folder of eval images: faces of any identity in them get dedup:eval_identity",
            ),
        ),
        examples=(
            "facecap dedup work/caption work/dedup (exact, perceptual and same-face duplicates)",
            "facecap dedup work/caption work/dedup --against eval-images/ (also drop anything close to a held-out "
            "eval set)",
            "facecap dedup work/caption work/dedup --kinds exact,near,embedding,identity --identity-cap 50",
            "facecap dedup work/caption work/dedup --opt-out-faces optout-photos/ --opt-out-embeddings optout.json "
            "--against-identities eval-faces/ (consent and face-level decontamination)",
        ),
    ),
)


def optout_add(
    file: Annotated[str, typer.Argument(help="the opt-out list file (JSON; made when missing)")],
    photos: Annotated[
        str, typer.Argument(help="photos of the people to add: a subfolder per person, or one photo per file")
    ],
    model: Annotated[
        str | None,
        typer.Option(help="face-embedding model for a new list (registry name or .onnx); default: the list's own"),
    ] = None,
) -> None:
    """Add people to an opt-out list: their photos' faces, kept as embeddings only (never the photos)."""
    from pathlib import Path

    from facecap.stages.shared.identity import (
        DEFAULT_EMBEDDING_MODEL,
        FaceEmbedder,
        OptOutList,
        reference_people,
    )

    listing = OptOutList.load(file) if Path(file).exists() else None
    embedder = FaceEmbedder(model or (listing.model if listing else DEFAULT_EMBEDDING_MODEL))
    if listing is None:
        listing = OptOutList(model=embedder.model, model_sha256=embedder.sha256)
    listing.check_model(embedder.model, embedder.sha256, "--model")
    people = reference_people(photos, embedder)
    before = listing.people
    listing.merge(OptOutList.from_people(people, embedder.model, embedder.sha256))
    listing.save(file)
    faces = sum(len(v) for v in people.values())
    typer.echo(
        f"optout: {faces} face(s) of {len(people)} person(s) added ({listing.people - before} new); "
        f"{file} holds {listing.people} people, {len(listing.vectors)} embeddings ({listing.model})"
    )


def optout_list(file: Annotated[str, typer.Argument(help="the opt-out list file")]) -> None:
    """How many people and embeddings an opt-out list holds, and its embedding model (no names)."""
    from facecap.stages.shared.identity import OptOutList

    listing = OptOutList.load(file)
    typer.echo(
        f"{file}: {listing.people} people, {len(listing.vectors)} embeddings; "
        f"model {listing.model} (sha256 {listing.model_sha256})"
    )


OPTOUT_EXAMPLES = """Examples:

* `facecap optout add optout.json photos/` (photos/alice/1.jpg, photos/alice/2.jpg, photos/bob.jpg: two people)
* `facecap optout list optout.json`
* `facecap dedup work/caption work/dedup --opt-out-embeddings optout.json`
* `facecap export work/dedup shards/ --opt-out-embeddings optout.json`
"""

# Command groups that are not a stage run: (name, help, ((command, function, epilog), ...)).
EXTRA_GROUPS = (
    (
        "optout",
        "The opt-out list: people who asked to leave the corpus, kept as face embeddings only.",
        (("add", optout_add, OPTOUT_EXAMPLES), ("list", optout_list, OPTOUT_EXAMPLES)),
    ),
)
