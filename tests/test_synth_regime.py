"""The named synth regimes: the values the docs and the help promise are the ones written, flags
override them, and the bench recipe of the imbalanced regime is a protocol without a method."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from avprep.manifest import read_manifest
from avprep.media import decode_clip
from avprep.synth import REGIMES, SynthConfig, regime_config
from avtrain.recipes import load_recipe
from avtrain.settings import make_config
from cli import avprep

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench.md"


def docs_table() -> dict[str, tuple[float, float]]:
    """{SynthConfig field: (default, imbalanced)} from the regime table of docs/bench.md."""
    rows = re.findall(r"^\| `--([a-z-]+)` \| ([\d.]+) \| ([\d.]+) \|$", DOCS.read_text(), re.M)
    return {flag.replace("-", "_"): (float(d), float(i)) for flag, d, i in rows}


def test_docs_table_is_the_regimes():
    table = docs_table()
    default, imbalanced = SynthConfig(), regime_config("imbalanced")
    assert set(REGIMES["imbalanced"]) <= set(table)
    for field, (want_default, want_imbalanced) in table.items():
        assert getattr(default, field) == want_default, field
        assert getattr(imbalanced, field) == want_imbalanced, field
    assert regime_config("default") == default


def test_help_states_each_imbalanced_value():
    text = " ".join(CliRunner().invoke(avprep, ["synth", "--help"]).output.split())
    for field, value in REGIMES["imbalanced"].items():
        shown = f"{value:g}"
        flag = "--" + field.replace("_", "-")
        assert flag in text, flag
        assert re.search(re.escape(flag) + r"[^\[]*\[default: [\d.]+; imbalanced: "
                         + re.escape(shown) + r"\]", text), field


def test_cli_writes_the_regime_and_flags_override(tmp_path):
    out = tmp_path / "regime"
    result = CliRunner().invoke(avprep, ["synth", str(out), "--regime", "imbalanced",
                                         "--per-class", "2", "--seconds", "0.5",
                                         "--workers", "2"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "synth.json").read_text())
    assert meta["regime"] == "imbalanced"
    want = {**REGIMES["imbalanced"], "per_class": 2, "seconds": 0.5}
    assert {k: meta["config"][k] for k in want} == want
    records = read_manifest(out / "manifest.jsonl").records
    assert len(records) == 12
    clip = decode_clip(records[0].video, fps=None, short_side=0, sample_rate=None)
    assert clip.frames[0].shape == (32, 32, 3)  # the regime's 32 px frames
    # 95 % audio reliability: of 12 clips at most a few lack the audio cue
    assert sum(r.extra["audio_cue"] is None for r in records) <= 3


@pytest.mark.parametrize("args,message", [
    (["--regime", "loud"], "Invalid value for '--regime'"),
    (["--regime", "imbalanced", "--test-fraction", "0.9"], "--val-fraction plus --test-fraction"),
    (["--test-fraction", "1.5"], "--test-fraction must be in [0, 1)"),
])
def test_bad_regime_input_is_one_line(tmp_path, args, message):
    result = CliRunner().invoke(avprep, ["synth", str(tmp_path / "x"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_recipe_is_a_protocol_without_a_method():
    recipe = load_recipe("synth-imbalanced")
    assert "method" not in recipe.settings
    assert "--regime imbalanced" in recipe.data["prepare"]
    config = make_config(recipe.settings, {"recipe": "synth-imbalanced", "method": "ogm_ge"})
    assert config.method == "ogm_ge" and config.model == "tiny" and config.image_size == 32
    assert make_config(recipe.settings).method == "none"
