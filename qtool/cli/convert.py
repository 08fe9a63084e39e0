"""`qtool convert`: int8 (static QDQ / QOperator, dynamic), 4/3/2-bit weight-only, fp16."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from qtool.cli.app import app, emit_json, progress, settings, warn, warn_if_workers_cannot_help
from qtool.cli.convert_report import print_report
from qtool.quant.blockwise import ALGORITHMS


class Format(str, Enum):
    qdq = "qdq"
    qoperator = "qoperator"
    matmulnbits = "matmulnbits"


class DType(str, Enum):
    int = "int"
    fp16 = "fp16"


class ActType(str, Enum):
    uint8 = "uint8"
    int8 = "int8"


ACTIVATION_BITS_HELP = (
    "16: A16W8, 16-bit activations (uint16, or int16 with --activation-type int8) with int8 weights, "
    "from the same calibration: 256x finer activation steps where 8 bits lose accuracy. Standard "
    "Q/DQ at opset 21 (--allow-opset-upgrade raises it), onnxruntime's com.microsoft Q/DQ below. "
    "An accuracy and NPU (QNN) format: onnxruntime's CPU provider runs those layers in float, so "
    "it is not faster there [default: 8]."
)

class TargetName(str, Enum):
    cpu = "cpu"
    cpu_vnni = "cpu-vnni"
    cpu_avx2 = "cpu-avx2"
    openvino = "openvino"
    qnn = "qnn"
    tensorrt = "tensorrt"


TARGET_HELP = (
    "Static int8 for a deployment runtime, with the Q/DQ placement it fuses: cpu (this machine: "
    "cpu-vnni, or cpu-avx2 = 7-bit weights where VNNI is missing), openvino (symmetric Q/DQ on "
    "Conv/MatMul/Add inputs only), qnn (checked against the QNN EP's rules), tensorrt (symmetric "
    "int8, checked) [default: onnxruntime CPU QDQ]. `qtool inspect --hw` names this machine's cpu variant."
)


# The choices are the library's own lists, so a new algorithm needs no CLI edit.
Algorithm = Enum("Algorithm", {name: name for name in ALGORITHMS}, type=str)


RECOVER_HELP = (
    "Static int8 accuracy recovery, comma-separated (needs --data): cle (cross-layer equalization "
    "of Conv pairs), smoothquant (MatMul inputs with outlier channels, Gemm inputs with uneven "
    "weight columns), adaround (learned rounding within [recovery] adaround_seconds), bias (bias "
    "correction) or bias-full (bias correction measured layer by layer on the quantized model: "
    "slower); all (cle,smoothquant,adaround,bias), or none. Without it, "
    "--scheme auto (the default with --data) runs smoothquant,bias. Recipes: [recovery] passes = [...]."
)


def _default_preset(dtype: DType | None, bits: int | None, dynamic: bool | None) -> str | None:
    if dtype == DType.fp16 or bits == 16:
        return "fp16"
    if bits in (2, 3, 4):
        return "int4-weight-only"
    if dynamic:
        return "int8-dynamic"
    return "int8-static"


def build_recipe(
    recipe: str | None, *, bits, dtype, dynamic, fmt, per_channel, symmetric_activations,
    activation_type, exclude, block_size, symmetric, algorithm, keep_8bit, accuracy_level,
    allow_opset_upgrade, samples, activation_bits=None, target=None,
):
    """The recipe with the flags that were given applied on top (None: keep the recipe's);
    ``target`` (a --target name) then fixes its preset's values (qtool.targets)."""
    from qtool.config import load_recipe

    r = load_recipe(recipe if recipe is not None else _default_preset(dtype, bits, dynamic))
    wo_format = None
    q_format = fmt.value if fmt is not None else None
    if fmt is not None and (bits in (2, 3, 4) or (bits is None and r.quantize.bits in (2, 3, 4))):
        wo_format = fmt.value  # --format qdq with 4 bits: blocked DequantizeLinear
        if fmt == Format.qdq:
            q_format = None
    r = r.override(
        "quantize",
        bits=bits,
        dtype="fp16" if bits == 16 else (dtype.value if dtype is not None else None),
        dynamic=dynamic,
        format=q_format,
        per_channel=per_channel,
        symmetric_activations=symmetric_activations,
        activation_type=activation_type.value if activation_type is not None else None,
        activation_bits=activation_bits,
        exclude=tuple(r.quantize.exclude) + tuple(exclude) if exclude else None,
        allow_opset_upgrade=allow_opset_upgrade or None,
    )
    if dtype == DType.fp16 and bits is None:
        r = r.override("quantize", bits=16)
    r = r.override(
        "weight_only",
        block_size=block_size,
        symmetric=symmetric,
        algorithm=algorithm.value if algorithm is not None else None,
        keep_8bit=tuple(r.weight_only.keep_8bit) + tuple(keep_8bit) if keep_8bit else None,
        accuracy_level=accuracy_level,
        format=wo_format,
    )
    r = r.override("calibration", samples=samples)
    if target is not None:
        r = r.override("quantize", target=target.value)
    if r.quantize.target:
        from qtool.targets import apply_target

        r = apply_target(r)
    return r


# Flags that belong to one scheme choose it: the guard then repairs, never swaps it.
FIXING_FLAGS = ("bits", "dtype", "dynamic", "fmt", "calib", "recipe", "per_channel", "symmetric_activations",
                "activation_type", "activation_bits", "block_size", "symmetric", "algorithm", "keep_8bit",
                "accuracy_level")


def _fixes_scheme(flags: dict) -> bool:
    """Whether the flags as given fix the scheme (else the default adapts, and with the guard
    it chooses)."""
    return (any(flags[k] is not None for k in FIXING_FLAGS) or flags["scheme"] not in (None, "auto")
            or _fixes(flags["target"]))


def _fixes(target: TargetName | None) -> bool:
    """Whether --target fixes the scheme: --target cpu on this machine is today's default
    (the guard may still choose, as without it), other targets are static int8 presets."""
    return target not in (None, TargetName.cpu, TargetName.cpu_vnni)


def check_target_flags(target: TargetName | None, *, bits, dtype, dynamic, fmt, per_channel,
                       symmetric_activations, activation_type) -> None:
    """A --target is a static int8 preset: flags it fixes otherwise, or another scheme, are
    usage errors naming the flag and what the target needs."""
    if target is None:
        return
    from qtool.errors import UsageError
    from qtool.targets import resolve, target_conflicts

    other = {"--dynamic": dynamic or None, "--dtype fp16": dtype == DType.fp16 or None,
             "--bits": bits if bits not in (None, 8) else None}
    given = [f"{k} {v}" if v is not True else k for k, v in other.items() if v is not None]
    if given:
        raise UsageError(f"--target {target.value} is a static int8 preset; {', '.join(given)} chooses another scheme",
                         "drop --target (it applies to static int8), or drop " + ", ".join(given))
    preset = resolve(target.value)
    flags = {"activation_type": activation_type.value if activation_type is not None else None,
             "per_channel": per_channel, "symmetric_activations": symmetric_activations,
             "format": fmt.value if fmt is not None else None}
    conflicts = target_conflicts(preset, flags)
    if conflicts:
        shown = "; ".join(f"--{k.replace('_', '-')} {str(v).lower()} ({why})" for k, v, why in conflicts)
        raise UsageError(f"--target {target.value} contradicts {shown}",
                         f"drop the flag: --target {target.value} already sets it")


def check_flags(*, bits, dtype, dynamic, data: Path | None, samples: int | None,
                activation_bits: int | None = None, fmt: Format | None = None) -> None:
    """Flags that contradict each other (a flag that cannot apply is an error, exit 2)."""
    from qtool.errors import UsageError

    if activation_bits is not None and activation_bits not in (8, 16):
        raise UsageError(f"--activation-bits {activation_bits} is not supported", "use 8, or 16 for A16W8")
    if activation_bits == 16:
        other = ("--dynamic" if dynamic else f"--bits {bits}" if bits not in (None, 8) else
                 "--dtype fp16" if dtype == DType.fp16 else
                 "--format qoperator" if fmt == Format.qoperator else None)
        if other is not None:
            raise UsageError(f"--activation-bits 16 and {other} cannot go together",
                             "16-bit activations are static QDQ with int8 weights: drop one of the two")
    if bits is not None and bits not in (2, 3, 4, 8, 16):
        raise UsageError(f"--bits {bits} is not supported", "use 8, 4, 3 or 2, or 16 (= --dtype fp16)")
    if dtype == DType.fp16 and bits not in (None, 16):
        raise UsageError(
            f"--dtype fp16 and --bits {bits} choose two different schemes",
            "use --dtype fp16 alone (half-precision float), or --bits without --dtype fp16",
        )
    if bits == 16 and dtype == DType.int:
        raise UsageError("16-bit integer weights are not supported", "use --bits 16 (or --dtype fp16) for half precision")
    if dynamic and (dtype == DType.fp16 or bits == 16):
        raise UsageError("--dynamic is an int8 scheme, --dtype fp16 is half precision", "pick one of the two")
    if samples is not None and data is None:
        raise UsageError("--samples needs --data", "add --data DIR, or drop --samples")


LAYER_EXECUTOR_HELP = ("local (this machine's processes, see --workers), ray (this machine's Ray cluster, "
                       "or a private one), or ray://HOST:10001 (a cluster's head). Results are identical.")


STORE_WEIGHTS_HELP = (
    "For a QAT / fake-quant model (float weights behind QuantizeLinear -> DequantizeLinear, as PyTorch, "
    "NNCF, ModelOpt and Brevitas export them): store the weights as the int8/int4 integers they stand "
    "for. The outputs stay bit for bit the same; the file shrinks 3-4x.")
RUNTIME_HELP = (
    "Guard: measure and time candidates against float where they will deploy: ort (default) or openvino "
    "(its default precision; pip install 'qtool[openvino]'). Without it, --target openvino/qnn/tensorrt "
    "candidates are measured on onnxruntime with Q/DQ as written, and not timed if its fusions reject them.")
REQUANTIZE_HELP = (
    "For an already-quantized model (QDQ, QOperator, fake-quant, Cast x scale int8 weights): dequantize "
    "it to float first, then convert as usual (every other flag applies), so nothing is quantized twice.")


@app.command("convert")
def convert_command(
    model: Path = typer.Argument(..., help="The .onnx model (never modified); an already-quantized one needs "
                                 "--store-weights, --format or --requantize."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the converted model."),
    bits: int = typer.Option(None, "--bits", help="8 (int8), 4/3/2 (weight-only blocks) or 16 (= --dtype fp16) [default: 8]."),
    dtype: DType = typer.Option(None, "--dtype", help="int, or fp16 for half precision."),
    calib: Path = typer.Option(None, "--calib", help="Calibration table (qtool calibrate)."),
    data: Path = typer.Option(None, "--data", help="Sample folder: calibrate inline (static int8), "
                              "smoothing statistics (dynamic), gptq/awq statistics, and the fidelity check."),
    samples: int = typer.Option(None, "--samples", help="Calibrate on the first N samples (0: all)."),
    dynamic: bool = typer.Option(None, "--dynamic", help="Dynamic int8: no data needed; with --data, outlier smoothing."),
    fmt: Format = typer.Option(None, "--format", help="qdq or qoperator (int8), matmulnbits or qdq (4-bit) [default: qdq for int8, matmulnbits for 4-bit]."),
    per_channel: bool = typer.Option(None, "--per-channel/--per-tensor", help="int8 weight granularity."),
    symmetric_activations: bool = typer.Option(None, "--symmetric-activations", help="Symmetric activation ranges."),
    activation_type: ActType = typer.Option(None, "--activation-type", help="uint8 (fused into onnxruntime's fast x86 kernels) or int8 [default: uint8]."),
    activation_bits: int = typer.Option(None, "--activation-bits", help=ACTIVATION_BITS_HELP),
    exclude: list[str] = typer.Option(None, "--exclude", help="Node name, glob or op type to keep in float (repeatable)."),
    recipe: str = typer.Option(None, "--recipe", help="Preset name or .toml path [default: by mode]."),
    block_size: int = typer.Option(None, "--block-size", help="Weight-only block size: 32, 64, 128, 256 [default: 128]."),
    symmetric: bool = typer.Option(None, "--symmetric/--asymmetric", help="Weight-only block symmetry."),
    algorithm: Algorithm = typer.Option(None, "--algorithm", help="Weight-only algorithm; gptq and awq need --data [default: rtn]."),
    keep_8bit: list[str] = typer.Option(None, "--keep-8bit", help="Weight-only: name pattern kept at 8 bits (repeatable)."),
    accuracy_level: int = typer.Option(None, "--accuracy-level", help="MatMulNBits accuracy level 0-4; 4 computes with int8 activations, the fast path on x86 [default: 4]."),
    external_data: bool = typer.Option(False, "--external-data", help="Write weights to OUT.data (the default when MODEL keeps its weights in a data file, or "
                                       "above protobuf's 2 GB: the output then streams to disk instead of being built in memory)."),
    allow_opset_upgrade: bool = typer.Option(False, "--allow-opset-upgrade", help="Let qtool raise the opset when the format needs it."),
    target: TargetName = typer.Option(None, "--target", help=TARGET_HELP),
    scheme: str = typer.Option(None, "--scheme", help="auto: try static and dynamic int8 on held-out samples and keep the smallest, fastest "
                               "one that meets the floor (the default with --data and no scheme flag), or a preset name."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Held-out samples for the guard "
                                   "[default: every 5th sample of --data, which calibration then skips]."),
    no_guard: bool = typer.Option(False, "--no-guard", help="Skip the guard: convert once, measure nothing, trust it."),
    min_sqnr: float = typer.Option(None, "--min-sqnr", help="Guard floor: worst output (channel group) SQNR in dB [default: 15]."),
    min_agreement: float = typer.Option(None, "--min-agreement", help="Guard floor: argmax agreement with float (logits, per-position scores) or mask IoU at 0.5 (probability maps), 0-1 [default: 0.9]."),
    guard_budget: float = typer.Option(None, "--guard-budget", help="Guard time budget in seconds [default: 600]."),
    runtime: str = typer.Option(None, "--runtime", help=RUNTIME_HELP),
    write_best: bool = typer.Option(False, "--write-best", help="When nothing meets the floor, still write the best candidate (exit stays 3)."),
    store_weights: bool = typer.Option(False, "--store-weights", help=STORE_WEIGHTS_HELP),
    requantize: bool = typer.Option(False, "--requantize", help=REQUANTIZE_HELP),
    recover: str = typer.Option(None, "--recover", metavar="PASSES", help=RECOVER_HELP),
    workers: int = typer.Option(1, "--workers", metavar="K", help="--algorithm gptq/awq: quantize K layers at a time in "
                                "local processes (each layer is independent given its recorded inputs)."),
    executor: str = typer.Option(None, "--executor", metavar="local|ray|ray://HOST:PORT",
                                 help="--algorithm gptq/awq: where layers are quantized. " + LAYER_EXECUTOR_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantize a model (int8 static/dynamic, 4/3/2-bit weight-only) or convert it to fp16.

    With --data and no scheme flag, the guard chooses the scheme: static and dynamic int8
    are converted, measured on held-out samples against the float model (per output and
    per channel group, argmax agreement, latency), repaired when below the floor, and the
    first that meets it is written; nothing meets it: exit 3, nothing written. Static int8
    without --data needs --calib TABLE.json. The output is verified to load in onnxruntime.

    \b
    Examples:
      qtool convert examples/digits_cnn.onnx -o int8.onnx --data examples/data/calib
      qtool convert examples/digits_cnn.onnx -o dyn.onnx --dynamic --exclude fc2
      qtool convert examples/digits_cnn.onnx -o int4.onnx --bits 4 --block-size 32
      qtool convert examples/digits_cnn.onnx -o fp16.onnx --dtype fp16
      qtool convert qat.onnx -o qat_int8.onnx --store-weights   (QAT export; refused without a flag)
    """
    flags = dict(locals())  # the parameters as given: which scheme flags a quantized model rejects
    from qtool.model import check_output_path
    from qtool.pipeline import convert_file, plan_for
    from qtool.pipeline.plan import check_inputs, speed_warnings

    check_flags(bits=bits, dtype=dtype, dynamic=dynamic, data=data, samples=samples, activation_bits=activation_bits, fmt=fmt)
    check_target_flags(target, bits=bits, dtype=dtype, dynamic=dynamic, fmt=fmt, per_channel=per_channel,
                       symmetric_activations=symmetric_activations, activation_type=activation_type)
    auto = _check_guard_flags(scheme=scheme, explicit=_fixes_scheme(flags), data=data, eval_data=eval_data,
                              no_guard=no_guard, min_sqnr=min_sqnr, min_agreement=min_agreement,
                              guard_budget=guard_budget, write_best=write_best, calib=calib, runtime=runtime)
    if (done := _convert_quantized_input(model, output, flags))[0]:
        return
    if scheme not in (None, "auto"):
        recipe = scheme
    r = build_recipe(
        recipe, bits=bits, dtype=dtype, dynamic=dynamic, fmt=fmt, per_channel=per_channel,
        symmetric_activations=symmetric_activations, activation_type=activation_type,
        exclude=exclude, block_size=block_size, symmetric=symmetric, algorithm=algorithm,
        keep_8bit=keep_8bit, accuracy_level=accuracy_level,
        allow_opset_upgrade=allow_opset_upgrade, samples=samples, activation_bits=activation_bits, target=target,
    )
    r = _with_recovery(r, recover, plan_for(r).kind, calib) if recover is not None else r
    plan = plan_for(r)
    check_inputs(r, plan, calib=calib, data=data)
    check_output_path(output, model)
    for message in speed_warnings(r, plan):
        warn(message)
    floor = None if no_guard else _floor(min_sqnr, min_agreement)  # convert_file runs it when --data is given
    with _layer_executor(executor, workers, r) as layers_on:
        report = convert_file(model, output, r, data=data, calib=calib, external_data=external_data,
                              progress=progress, guard=floor, eval_data=eval_data, auto=auto,
                              budget_s=guard_budget, write_best=write_best,
                              quantized_input=_requantize_request(requantize),
                              runtime=_guard_runtime(runtime), executor=layers_on, loaded=done[1])
    _finish(report, json_out)


def _layer_executor(spec: str | None, workers: int, recipe):  # noqa: ANN001, ANN202 - a context manager
    """The executor gptq/awq layers run on, as a context that closes it (None: this process);
    an error for any other scheme, since nothing else in convert fans out."""
    if spec is None and workers == 1:
        from contextlib import nullcontext

        return nullcontext(None)
    from qtool.errors import UsageError
    from qtool.executors import make_executor
    from qtool.pipeline import plan_for
    from qtool.quant.blockwise import DATA_AWARE

    if plan_for(recipe).kind != "weight-only" or recipe.weight_only.algorithm not in DATA_AWARE:
        raise UsageError("--workers/--executor fan out gptq/awq layer work, and this conversion has none",
                         "add --bits 4 --algorithm gptq --data DIR, or drop --workers/--executor "
                         "(`qtool calibrate --workers` fans out calibration)")
    executor = make_executor(spec, workers)
    warn_if_workers_cannot_help(executor)
    return executor


def _finish(report: dict, json_out: bool) -> None:
    for message in report["warnings"]:
        warn(message)
    if json_out:
        emit_json(report)
    if not settings.quiet or not json_out:
        print_report(report)
    _exit_on_failure(report)


_NO_FLAGS = dict(bits=None, dtype=None, dynamic=None, fmt=None, per_channel=None, symmetric_activations=None,
                 activation_type=None, exclude=None, block_size=None, symmetric=None, algorithm=None,
                 keep_8bit=None, accuracy_level=None, allow_opset_upgrade=False, samples=None)


# Flags that choose how to quantize: on an already-quantized model only --requantize uses them.
SCHEME_FLAGS = {
    "--bits": "bits", "--dtype": "dtype", "--dynamic": "dynamic", "--calib": "calib", "--recipe": "recipe",
    "--samples": "samples", "--per-channel/--per-tensor": "per_channel",
    "--symmetric-activations": "symmetric_activations", "--activation-type": "activation_type",
    "--activation-bits": "activation_bits",
    "--exclude": "exclude", "--block-size": "block_size", "--symmetric/--asymmetric": "symmetric",
    "--algorithm": "algorithm", "--keep-8bit": "keep_8bit", "--accuracy-level": "accuracy_level",
    "--allow-opset-upgrade": "allow_opset_upgrade", "--scheme": "scheme", "--eval-data": "eval_data",
    "--no-guard": "no_guard", "--min-sqnr": "min_sqnr", "--min-agreement": "min_agreement",
    "--guard-budget": "guard_budget", "--write-best": "write_best", "--recover": "recover",
    "--executor": "executor",
}


def _scheme_flags(params: dict) -> dict:
    """{flag: value} of the scheme flags, None (or False / empty) when not given."""
    return {flag: params[name] if params[name] not in (False, [], ()) else None
            for flag, name in SCHEME_FLAGS.items()}


def _requantize_request(requantize: bool):  # noqa: ANN202 - QuantizedInput | None
    from qtool.pipeline.plan import QuantizedInput

    return QuantizedInput(requantize=True) if requantize else None


def _convert_quantized_input(model: Path, output: Path, flags: dict):  # noqa: ANN202 - (bool, ir.Model)
    """Store / re-target an already-quantized model when the flags say so (True: done); refuse
    one without a flag (exit 1); False for the normal flow (a float model, or --requantize).
    Also returns the model as loaded, so the normal flow does not load it a second time."""
    from qtool.model import check_output_path
    from qtool.pipeline import convert_file

    if not model.exists():
        from qtool.errors import ModelError

        raise ModelError(f"model file not found: {model}", "check the path")
    quantized, loaded = _quantized_input(model, store_weights=flags["store_weights"], requantize=flags["requantize"],
                                         fmt=flags["fmt"], given=_scheme_flags(flags))
    if quantized is None:
        return False, loaded
    check_output_path(output, model)
    report = convert_file(model, output, build_recipe(None, **_NO_FLAGS), data=flags["data"],
                          external_data=flags["external_data"], quantized_input=quantized, loaded=loaded)
    _finish(report, flags["json_out"])
    return True, None


def _quantized_input(model: Path, *, store_weights: bool, requantize: bool, fmt, given: dict):  # noqa: ANN001, ANN202
    """(the request for an already-quantized ``model`` when it is one and the flags keep its
    quantization (store / re-target), else None (the normal flow; --requantize goes there);
    the loaded model). Refuses (exit 1) a quantized model without a flag saying what to do with it."""
    from qtool.model import load
    from qtool.pipeline.plan import QuantizedInput, plan_quantized_input

    request = QuantizedInput(store_weights=store_weights, requantize=requantize,
                             format=None if requantize or fmt is None else fmt.value)
    flags = tuple(name for name, value in given.items() if value is not None)
    loaded = load(model)
    plan = plan_quantized_input(loaded, request, scheme_flags=() if requantize else flags)
    return (request if plan is not None and plan.kind == "quantized-input" else None), loaded


def _with_recovery(r, text: str, kind: str, calib):  # noqa: ANN001, ANN202 - Recipe
    """The recipe with --recover's passes; an error where they cannot apply."""
    from qtool.errors import UsageError
    from qtool.passes.recovery import NEEDS_DATA_HINT, parse_passes

    passes = parse_passes(text)
    if passes and kind != "int8-static":
        raise UsageError(f"--recover applies to static int8, not to {kind}",
                         "drop --recover, or drop --dynamic / --bits / --dtype")
    if passes and calib is not None:
        raise UsageError("--recover cannot use a --calib table made beforehand (recovery reads the "
                         "samples and moves the ranges)", NEEDS_DATA_HINT)
    return r.override("recovery", passes=passes, auto=False)


def _exit_on_failure(report: dict) -> None:
    """Exit 3 (GateFailed) when the conversion did not succeed, saying what was written."""
    if report["passed"]:
        return
    from qtool.errors import GateFailed

    written = f"; the best candidate was written to {report['output']}" if report["output"] else ""
    raise GateFailed(report["failure"] + written, report["hint"])


def _floor(min_sqnr: float | None, min_agreement: float | None):  # noqa: ANN202 - Floor
    from qtool.pipeline.guard import Floor

    defaults = Floor()
    return Floor(min_sqnr if min_sqnr is not None else defaults.min_sqnr_db,
                 min_agreement if min_agreement is not None else defaults.min_agreement)


def _guard_runtime(name: str | None):  # noqa: ANN202 - qtool.runtime.Runtime | None
    """--runtime as a validated runtime (unknown names, a missing extra: errors)."""
    from qtool.runtime import runtime

    return None if name is None else runtime(name)


def _check_guard_flags(*, scheme, explicit, data, eval_data, no_guard, min_sqnr, min_agreement,  # noqa: ANN001
                       guard_budget, write_best, calib, runtime=None) -> bool:
    """Guard flags that cannot apply are errors; returns whether the user left the scheme to
    qtool (no scheme flag: the default adapts, and with the guard it chooses)."""
    from qtool.config import preset_names
    from qtool.errors import UsageError

    if scheme is not None and scheme != "auto" and scheme not in preset_names():
        raise UsageError(f"--scheme {scheme} is not a scheme", f"use auto or a preset: {', '.join(preset_names())}")
    if scheme is not None and explicit and scheme == "auto":
        raise UsageError("--scheme auto chooses the scheme itself", "drop --scheme auto, or drop --bits/--dtype/--dynamic/--format/--recipe/--calib")
    guard_flags = {"--eval-data": eval_data, "--min-sqnr": min_sqnr, "--min-agreement": min_agreement,
                   "--guard-budget": guard_budget, "--write-best": write_best or None, "--runtime": runtime}
    given = [k for k, v in guard_flags.items() if v is not None]
    if given and (no_guard or data is None or calib is not None):
        why = "--no-guard" if no_guard else ("--calib (the guard calibrates on --data itself)" if calib is not None else "no --data")
        raise UsageError(f"{', '.join(given)} cannot apply with {why}",
                         "the guard runs with --data; drop the guard flags or add --data DIR")
    if scheme == "auto" and data is None:
        raise UsageError("--scheme auto needs --data", "pass --data DIR: the guard measures candidates on it")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise UsageError(f"--min-agreement must be between 0 and 1, got {min_agreement}", "e.g. 0.9")
    if guard_budget is not None and guard_budget <= 0:
        raise UsageError(f"--guard-budget must be > 0 seconds, got {guard_budget}", "e.g. 300")
    return not explicit
