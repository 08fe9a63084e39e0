"""Recipes: named, versionable sets of choices for calibrate / convert / eval.

A recipe is a TOML file of sections that map onto frozen dataclasses. Named presets live in the
repository's ``configs/`` folder, installed as the package ``qtool.configs`` (``--recipe
int8-static``, or ``--recipe configs/int8-static.toml`` from a checkout); any path to a
``.toml`` file works as well.
CLI flags override recipe values (``Recipe.override``). Unknown keys are rejected by name,
so a typo never silently falls back to a default.

Example::

    [quantize]
    bits = 8
    per_channel = true
    exclude = ["head/Gemm"]

    [calibration]
    method = "percentile"
    percentile = 99.99

    [[layer]]                 # per-layer overrides, first match wins
    match = "lm_head*"
    bits = 8

    [[layer]]                 # 16-bit activations (A16W8) for the matching nodes
    match = "head/*"
    activation_bits = 16
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from qtool.errors import RecipeError


def _config_dir() -> Path:
    """Where the presets are: ``qtool/configs`` in an installed wheel (setup.py maps the
    repository's ``configs/`` there), else the checkout's ``configs/`` beside this package
    (an editable install, or the source tree on PYTHONPATH). One copy of the files either way."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):
        if (folder / "int8-static.toml").is_file():
            return folder
    return here / "configs"  # not found: preset_names() is empty and the error lists none


CONFIG_DIR = _config_dir()


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "minmax"  # minmax | percentile | entropy | mse
    percentile: float = 99.99
    bins: int = 2048
    samples: int = 0  # 0: every sample in the folder
    batch_size: int = 1
    moving_average: float = 0.0  # 0: plain min/max; else the EMA constant for min/max
    symmetric: bool = False


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 8
    dtype: str = "int"  # int | fp16
    dynamic: bool = False
    weights_only: bool = False  # int8 weight storage (Cast + Mul), float activations
    format: str = "qdq"  # qdq | qoperator | matmulnbits
    per_channel: bool = True
    symmetric_activations: bool = False
    activation_type: str = "uint8"  # uint8 runs fused on x86 CPUs; int8 often does not
    activation_bits: int = 8  # 16: A16W8, uint16/int16 activations (signedness of activation_type)
    weight_type: str = "int8"
    op_types: tuple[str, ...] = ()  # empty: every op of the registry
    exclude: tuple[str, ...] = ()  # node names, op types or glob patterns left in float
    allow_opset_upgrade: bool = False
    # A deployment target's preset (qtool.targets): cpu, cpu-vnni, cpu-avx2, openvino, qnn,
    # tensorrt; "" keeps the values above as they are (onnxruntime CPU's conventions).
    target: str = ""


@dataclass(frozen=True)
class WeightOnlyConfig:
    block_size: int = 128
    symmetric: bool = True
    algorithm: str = "rtn"  # rtn | mse | hqq | gptq | awq
    format: str = "matmulnbits"  # matmulnbits | qdq
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations, the fast path on x86
    keep_8bit: tuple[str, ...] = ()
    quantize_gather: bool = True


@dataclass(frozen=True)
class Fp16Config:
    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = ("Resize", "Range", "CumSum", "TopK", "NonMaxSuppression")


@dataclass(frozen=True)
class PreprocessConfig:
    """How image files become input tensors (ignored for .npy/.npz/.pb datasets)."""

    resize: int = 0  # shorter side, pixels; 0 keeps the size
    crop: int = 0  # center crop to crop x crop; 0: none
    size: tuple[int, ...] = ()  # (height, width) to resize to exactly; overrides resize/crop
    scale: float = 1.0 / 255.0  # applied to 0..255 pixels before mean/std
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"  # NCHW | NHWC
    color: str = "RGB"  # RGB | BGR | L
    dtype: str = "float32"


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = ()
    runs: int = 50
    warmup: int = 5
    threads: int = 0  # 0: onnxruntime's default
    max_drop: float | None = None
    min_sqnr: float | None = None
    max_latency_ratio: float | None = None


@dataclass(frozen=True)
class RecoveryConfig:
    """Accuracy recovery for static int8 (qtool.passes.recovery); needs calibration data."""

    passes: tuple[str, ...] = ()  # any of cle, smoothquant, adaround, bias (or bias-full)
    samples: int = 32  # calibration samples bias correction / AdaRound / SmoothQuant read (0: all)
    adaround_seconds: float = 120.0  # AdaRound's time budget over all layers
    # With no scheme chosen (--scheme auto, the default with --data) and no passes given,
    # static int8 runs qtool.passes.recovery.DEFAULT (measured to pay: bench/recovery.py).
    auto: bool = True


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer choice: nodes whose name (or op type) matches ``match`` get these bits.

    bits: 32 keeps float, 16 fp16, 8/4/3/2 integer. Used by `qtool tune` output recipes.
    activation_bits: 16 gives the node's activations (inputs and outputs) 16-bit QDQ in
    static int8 (A16W8), 8 keeps them 8-bit. Either key may be given alone (None: not set);
    each is looked up first-match among the rules that set it.
    """

    match: str
    bits: int | None = None
    activation_bits: int | None = None

    def matches(self, node_name: str, op_type: str = "") -> bool:
        return fnmatch.fnmatchcase(node_name, self.match) or self.match == op_type


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    weight_only: WeightOnlyConfig = field(default_factory=WeightOnlyConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    layer: tuple[LayerOverride, ...] = ()

    def override(self, section: str, **values: Any) -> Recipe:
        """A copy with ``values`` set in ``section``; ``None`` values mean "not given"."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        current = getattr(self, section)
        try:
            updated = dataclasses.replace(current, **_coerce_section(type(current), values, section))
        except TypeError as exc:
            raise RecipeError(f"bad override for [{section}]: {exc}") from None
        return dataclasses.replace(self, **{section: updated})

    def bits_for(self, node_name: str, op_type: str, default: int) -> int:
        for rule in self.layer:
            if rule.bits is not None and rule.matches(node_name, op_type):
                return rule.bits
        return default

    def activation_bits_for(self, node_name: str, op_type: str) -> int:
        """The activation bits of a node: the first [[layer]] rule that sets
        ``activation_bits`` and matches, else ``quantize.activation_bits``."""
        for rule in self.layer:
            if rule.activation_bits is not None and rule.matches(node_name, op_type):
                return rule.activation_bits
        return self.quantize.activation_bits

    def wide_activations(self) -> bool:
        """Whether any node may get 16-bit activations (the scheme or a [[layer]] rule)."""
        return self.quantize.activation_bits == 16 or any(r.activation_bits == 16 for r in self.layer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Values a recipe file may give for keys that take one of a few words, and lower bounds for
# counts. They are checked when a recipe file is read, so a typo fails with the valid choices
# (exit 2) instead of surfacing later as an unrelated error; flags are checked by the CLI.
_CHOICES = {
    ("calibration", "method"): ("minmax", "percentile", "entropy", "mse"),
    ("quantize", "dtype"): ("int", "fp16"),
    ("quantize", "format"): ("qdq", "qoperator", "matmulnbits"),
    ("quantize", "activation_type"): ("uint8", "int8"),
    ("quantize", "weight_type"): ("int8", "uint8"),
    ("weight_only", "algorithm"): ("rtn", "mse", "hqq", "gptq", "awq"),
    ("weight_only", "format"): ("matmulnbits", "qdq"),
    ("preprocess", "layout"): ("NCHW", "NHWC"),
    ("preprocess", "color"): ("RGB", "BGR", "L"),
    ("recovery", "passes"): ("cle", "smoothquant", "adaround", "bias", "bias-full"),
}
_INT_CHOICES = {("quantize", "activation_bits"): (8, 16)}
_MINIMUM = {
    ("calibration", "samples"): (0, "0 uses every sample"),
    ("calibration", "batch_size"): (1, "e.g. batch_size = 8"),
    ("eval", "runs"): (1, "e.g. runs = 50"),
    ("eval", "warmup"): (0, "e.g. warmup = 5"),
    ("eval", "threads"): (0, "0 lets onnxruntime choose"),
    ("recovery", "samples"): (0, "0 uses every calibration sample"),
    ("recovery", "adaround_seconds"): (0, "e.g. adaround_seconds = 120"),
}

_SECTIONS = {
    "calibration": CalibrationConfig,
    "quantize": QuantizeConfig,
    "weight_only": WeightOnlyConfig,
    "fp16": Fp16Config,
    "preprocess": PreprocessConfig,
    "eval": EvalConfig,
    "recovery": RecoveryConfig,
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_recipe(name_or_path: str | Path | None) -> Recipe:
    """A recipe by preset name (``int8-static``) or by path to a TOML file; None: defaults."""
    if name_or_path is None:
        return Recipe()
    candidate = Path(name_or_path)
    if candidate.suffix != ".toml" and (CONFIG_DIR / f"{name_or_path}.toml").exists():
        candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        raise RecipeError(
            f"recipe not found: {name_or_path}",
            f"use a preset ({', '.join(preset_names())}) or a path to a .toml file",
        )
    try:
        data = tomllib.loads(candidate.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {candidate} is not valid TOML: {exc}", "fix the syntax") from None
    return recipe_from_dict(data, default_name=candidate.stem, source=str(candidate))


def recipe_from_dict(data: dict[str, Any], default_name: str = "custom", source: str = "") -> Recipe:
    where = f" in {source}" if source else ""
    top_keys = {"name", "description", "layer", *_SECTIONS}
    unknown = sorted(set(data) - top_keys)
    if unknown:
        raise RecipeError(
            f"unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{where}",
            f"valid top-level keys: {', '.join(sorted(top_keys))}",
        )
    kwargs: dict[str, Any] = {
        "name": str(data.get("name", default_name)),
        "description": str(data.get("description", "")),
    }
    for section, cls in _SECTIONS.items():
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise RecipeError(f"[{section}] must be a table{where}", f"write it as [{section}]")
        coerced = _coerce_section(cls, values, section, where)
        _check_values(section, coerced, where)
        kwargs[section] = cls(**coerced)
    layers = data.get("layer", [])
    if not isinstance(layers, list):
        raise RecipeError(f"'layer' must be an array of tables{where}", "write it as [[layer]]")
    kwargs["layer"] = tuple(_layer_rule(entry, where) for entry in layers)
    return Recipe(**kwargs)


def _layer_rule(entry: Any, where: str) -> LayerOverride:
    """One [[layer]] table: ``match`` and ``bits`` and/or ``activation_bits``."""
    keys = set(entry) if isinstance(entry, dict) else set()
    if not keys or keys - {"match", "bits", "activation_bits"} or "match" not in keys or keys == {"match"}:
        raise RecipeError(
            f"bad [[layer]] entry {entry}{where}",
            "each [[layer]] needs match = \"pattern\" and bits = 32|16|8|4|3|2 and/or activation_bits = 8|16",
        )
    bits, act = entry.get("bits"), entry.get("activation_bits")
    if bits is not None and bits not in (32, 16, 8, 4, 3, 2):
        raise RecipeError(f"[[layer]] bits must be 32, 16, 8, 4, 3 or 2{where}, got {bits!r}",
                          "32 keeps the layer float, 16 makes it fp16; e.g. bits = 8")
    if act is not None and (act not in (8, 16) or isinstance(act, bool)):
        raise RecipeError(f"[[layer]] activation_bits must be 8 or 16{where}, got {act!r}",
                          "16 gives the matching nodes 16-bit activations (A16W8); e.g. activation_bits = 16")
    return LayerOverride(str(entry["match"]), None if bits is None else int(bits),
                         None if act is None else int(act))


def _check_values(section: str, values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        choices = _CHOICES.get((section, key))
        if choices is not None and isinstance(value, tuple):  # a list of choices
            value = next((v for v in value if v not in choices), choices[0])
        if choices is not None and value not in choices:
            raise RecipeError(f"{section}.{key} = {value!r} is not one of {', '.join(choices)}{where}",
                              f'e.g. {key} = "{choices[0]}"')
        allowed = _INT_CHOICES.get((section, key))
        if allowed is not None and value not in allowed:
            raise RecipeError(f"{section}.{key} must be one of {', '.join(map(str, allowed))}{where}, got {value!r}",
                              f"e.g. {key} = {allowed[-1]}")
        minimum = _MINIMUM.get((section, key))
        if minimum is not None and value < minimum[0]:
            raise RecipeError(f"{section}.{key} must be >= {minimum[0]}{where}, got {value!r}", minimum[1])


def _coerce_section(cls: type, values: dict[str, Any], section: str, where: str = "") -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(f'{section}.{k}') for k in unknown)}{where}",
            f"valid keys in [{section}]: {', '.join(sorted(fields))}",
        )
    out = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise RecipeError(f"{section}.{key} must be true or false{where}, got {value!r}",
                              f"write it without quotes: {key} = {'true' if default else 'false'}")
        elif isinstance(default, int) and not isinstance(default, bool) and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise RecipeError(f"{section}.{key} must be an integer{where}, got {value!r}",
                              f"write a whole number without quotes, e.g. {key} = {default}")
        elif isinstance(default, float) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RecipeError(f"{section}.{key} must be a number{where}, got {value!r}",
                              f"write a number without quotes, e.g. {key} = {default}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise RecipeError(f"{section}.{key} must be a string{where}, got {value!r}",
                              f'write it in quotes, e.g. {key} = "{default}"')
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out
