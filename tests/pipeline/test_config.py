"""Recipes: YAML validated by pydantic, one clear line per mistake, flags override files."""

from __future__ import annotations

from pathlib import Path

import pytest

from facecap.cli import REGISTRY
from facecap.pipeline.config import load_recipe, parse_set_options
from facecap.pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(REPO / "configs" / name, REGISTRY)
    assert recipe.stages and all(stage in REGISTRY for stage in recipe.stages)


def test_default_recipe_reads_laion_columns():
    recipe = load_recipe(REPO / "configs" / "default.yaml", REGISTRY)
    assert (recipe.ingest.url_column, recipe.ingest.caption_column) == ("URL", "TEXT")
    assert recipe.ingest.shard_size == 10_000


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "ingest:\n  shard_sise: 5\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, REGISTRY)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "unknown key 'ingest.shard_sise'" in message
    assert "did you mean 'ingest.shard_size'" in message
    assert "\n" not in message


def test_wrong_type_says_what_is_expected(tmp_path):
    path = write(tmp_path, "ingest:\n  shard_size: lots\n")
    with pytest.raises(ConfigError, match=r"ingest\.shard_size: .*integer.*'lots'"):
        load_recipe(path, REGISTRY)


def test_out_of_range_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"shard_size: .*greater than or equal to 1"):
        load_recipe(write(tmp_path, "ingest: {shard_size: 0}\n"), REGISTRY)
    with pytest.raises(ConfigError, match=r"runner\.executor"):
        load_recipe(write(tmp_path, "runner: {executor: spark}\n"), REGISTRY)


def test_unknown_stage_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage 'teleport'"):
        load_recipe(write(tmp_path, "stages: [ingest, teleport]\n"), REGISTRY)
    with pytest.raises(ConfigError, match=r"unknown key 'ingset'.*did you mean 'ingest'"):
        load_recipe(write(tmp_path, "ingset: {}\n"), REGISTRY)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.yaml", REGISTRY)
    with pytest.raises(ConfigError, match=r"line 2: found character"):
        load_recipe(write(tmp_path, "ingest:\n\tshard_size: 1\n"), REGISTRY)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"), REGISTRY)


def test_several_problems_are_counted(tmp_path):
    path = write(tmp_path, "ingest: {shard_size: x, max_url_length: y}\n")
    with pytest.raises(ConfigError, match=r"and 1 more problem\]"):
        load_recipe(path, REGISTRY)


def test_overrides_beat_the_file_and_parse_as_yaml(tmp_path):
    path = write(tmp_path, "ingest: {shard_size: 5, url_column: URL}\n")
    overrides = parse_set_options(["ingest.shard_size=7", "ingest.caption_column=null", "ray.num_cpus=1"])
    recipe = load_recipe(path, REGISTRY, overrides)
    assert recipe.ingest.shard_size == 7
    assert recipe.ingest.caption_column is None
    assert recipe.ingest.url_column == "URL"
    assert recipe.ray.num_cpus == 1


def test_bad_set_option():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set_options(["ingest.shard_size"])


def test_defaults_without_a_file():
    recipe = load_recipe(None, REGISTRY)
    assert recipe.runner.max_retries == 2
    assert recipe.ray.reserve_cpus == 0  # the driver only waits: model stages get every core


def _bomb(levels: int = 9) -> str:
    """Nested YAML aliases: each level repeats the one before nine times (9**levels values)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 9)}]")
    lines.append(f"ingest: {{shard_size: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("ingest:\n  caption_column: l\xe9gende\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte \d+\)"):
        load_recipe(path, REGISTRY)


def test_alias_bombs_and_cycles_are_refused_and_echoed_values_are_cut(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert len(_bomb()) < 600
    with pytest.raises(ConfigError, match="expands to more than 100,000 values") as refused:
        load_recipe(bomb, REGISTRY)
    assert len(str(refused.value)) < 300
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("ingest: &a {input: [*a]}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(cycle, REGISTRY)
    # The same bomb as one --set value (a flow mapping of anchored lists).
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    with pytest.raises(ConfigError, match=r"--set ingest\.input: the recipe expands"):
        parse_set_options(["ingest.input={" + ", ".join(levels) + "}"])
    # A long value is echoed cut, not whole.
    big = tmp_path / "big.yaml"
    big.write_text("ingest: {shard_size: " + "y" * 100_000 + "}\n")
    with pytest.raises(ConfigError) as echoed:
        load_recipe(big, REGISTRY)
    assert len(str(echoed.value)) < 400 and "..." in str(echoed.value)
