"""qtool.config: the recipe presets live once, in the repository's configs/ folder, which the
package loads by name and users load by path (issue 13, issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool.cli import run
from qtool.config import load_recipe, preset_names

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "data" / "calib"


def test_configs_folder_holds_the_preset_files():
    files = sorted((ROOT / "configs").glob("*.toml"), key=lambda f: f.stem)
    assert [f.stem for f in files] == ["fp16", "fp16-weights", "int4-weight-only", "int8-a16w8", "int8-dynamic",
                                       "int8-static", "int8-weights"]
    for f in files:
        assert f.is_file() and not f.is_symlink(), f
    assert not [p for p in (ROOT / "configs").iterdir() if p.is_symlink()]


def test_the_package_loads_the_same_presets_by_name():
    assert preset_names() == ["fp16", "fp16-weights", "int4-weight-only", "int8-a16w8", "int8-dynamic", "int8-static",
                              "int8-weights"]
    for name in preset_names():
        by_name = load_recipe(name)
        by_path = load_recipe(ROOT / "configs" / f"{name}.toml")
        assert by_name == by_path
        assert by_name.name == name
    assert load_recipe("int8-dynamic").quantize.dynamic is True


def test_recipe_path_from_the_readme_works(tmp_path, monkeypatch, capsys):
    """`--recipe configs/int8-static.toml`, run from a checkout's root."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "table.json"
    code = run(["calibrate", str(MODEL), "--data", str(CALIB), "-o", str(out),
                "--recipe", "configs/int8-static.toml", "--samples", "4", "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 4 and summary["method"] == "minmax"
    assert out.exists()


@pytest.mark.parametrize(
    ("toml", "fragment", "hint"),
    [
        ('[calibration]\nbins = "many"\n', "calibration.bins must be an integer", "bins = 2048"),
        ("[quantize]\nper_channel = 1\n", "quantize.per_channel must be true or false", "per_channel = true"),
        ('[calibration]\nmethod = "best"\n', "calibration.method", "minmax"),
        ('[quantize]\nformat = "onnx"\n', "quantize.format", "qdq"),
        ('[weight_only]\nalgorithm = "magic"\n', "weight_only.algorithm", "gptq"),
        ('[quantize]\nactivation_type = "u8"\n', "quantize.activation_type", "uint8"),
        ("[calibration]\nsamples = -5\n", "calibration.samples must be >= 0", "every sample"),
        ("[[layer]]\nmatch = \"fc*\"\nbits = 5\n", "bits must be 32, 16, 8, 4, 3 or 2", "bits = 8"),
    ],
)
def test_a_bad_recipe_value_is_a_usage_error_with_a_hint(tmp_path, capsys, toml, fragment, hint):
    recipe = tmp_path / "r.toml"
    recipe.write_text(toml)
    code = run(["calibrate", str(MODEL), "--data", str(CALIB), "-o", str(tmp_path / "t.json"),
                "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), err
    assert fragment in lines[0], err
    assert hint in err, err
    assert not (tmp_path / "t.json").exists()
