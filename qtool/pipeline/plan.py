"""Which scheme a recipe selects and what it needs, decided before any model is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qtool.config import LayerOverride, Recipe
from qtool.errors import UsageError

WEIGHT_ONLY_BITS = (2, 3, 4)

# Measured here (onnxruntime 1.32, CPU provider, 2 threads, AVX-512 VNNI; bench/convert_int8.py
# and bench/convert_lowbit.py): ResNet-18-shaped CNN fp32 96.5 ms; QDQ with int8 activations
# 104 ms; with uint8 activations 37-40 ms. MatMulNBits int4 decoder stack, one token:
# accuracy_level 0 277 ms, accuracy_level 4 82 ms.
SLOW_INT8_ACTIVATIONS = (
    "int8 activations in QDQ are not fused into onnxruntime's fast x86 kernels (measured here "
    "on a ResNet-18-shaped CNN: 104 ms vs 97 ms fp32, and 37-40 ms with uint8 activations); "
    "--activation-type uint8 is the fast choice on this CPU"
)
# bench/a16w8.py (onnxruntime 1.32, CPU provider): EfficientNet-Lite0 1-thread CPU time fp32
# 9.3 ms, static int8 5.3 ms, A16W8 34 ms (onnxruntime's own A16W8: 31 ms).
SLOW_WIDE_ACTIVATIONS = (
    "16-bit activations are an accuracy (and NPU) format: onnxruntime's CPU provider has no 16-bit "
    "integer kernels and runs those layers in float between 16-bit quantize/dequantize steps "
    "(measured here on EfficientNet-Lite0: 3.7x fp32's CPU time, static int8 0.57x); it also "
    "requantizes the input of int8-weight MatMuls to 8 bits unless the session sets "
    "session.qdq_matmulnbits_accuracy_level=0"
)
SLOW_ACCURACY_LEVEL = (
    "MatMulNBits accuracy_level {level} computes in float on the CPU provider (measured here: "
    "3.4x slower per token than --accuracy-level 4, which uses int8 activations)"
)


@dataclass(frozen=True)
class ConvertPlan:
    """The scheme a recipe selects (a key of ``qtool.pipeline.schemes.SCHEMES``)."""

    kind: str  # "fp16" | "fp16-weights" | "weight-only" | "int8-weights" | "int8-dynamic" | "int8-static"
    needs_table: bool
    format: str


def plan_for(recipe: Recipe) -> ConvertPlan:
    """The scheme for ``recipe``; raises UsageError for combinations that make no sense."""
    q = recipe.quantize
    if q.activation_bits not in (8, 16):
        raise UsageError(f"--activation-bits {q.activation_bits} is not supported", "use 8, or 16 for A16W8")
    if q.target and (q.dtype == "fp16" or q.bits != 8 or q.format == "matmulnbits" or q.weights_only):
        raise UsageError(f"target {q.target} is a static int8 preset, not fp16, weight-only or int8 weights alone",
                         "drop the target, or convert to static int8 (--bits 8)")
    if q.dtype == "fp16":
        _no_wide_activations(recipe, "--dtype fp16 is half-precision float")
        if q.weights_only:  # float16 weight storage, float compute (qtool.passes.int8_weights)
            return ConvertPlan("fp16-weights", False, "float-activations")
        return ConvertPlan("fp16", False, "fp16")
    if q.dtype != "int":
        raise UsageError(f"unknown dtype {q.dtype!r}", "use --dtype int or --dtype fp16")
    if q.bits in WEIGHT_ONLY_BITS or q.format == "matmulnbits":
        if q.dynamic:
            raise UsageError("--dynamic is an int8 mode", "drop --dynamic for weight-only 4/3/2-bit")
        _no_wide_activations(recipe, f"--bits {q.bits} is weight-only (activations stay float)")
        if q.format == "qoperator":
            raise UsageError(
                "--format qoperator is an int8 format",
                "use --format matmulnbits or qdq for 4/3/2-bit weights",
            )
        fmt = "matmulnbits" if q.format == "matmulnbits" else recipe.weight_only.format
        return ConvertPlan("weight-only", False, fmt)
    if q.bits != 8:
        raise UsageError(f"--bits {q.bits} is not supported", "use --bits 8, 4, 3 or 2, or --dtype fp16")
    if q.activation_type not in ("uint8", "int8") or q.weight_type not in ("int8", "uint8"):
        raise UsageError(
            f"activation type {q.activation_type!r} / weight type {q.weight_type!r} not supported",
            "use uint8 or int8",
        )
    if q.weights_only:
        _no_wide_activations(recipe, "weights_only keeps activations float")
        if q.dynamic:
            raise UsageError("weights_only keeps activations float; --dynamic quantizes them at run time",
                             "pick one of the two")
        if q.format == "qoperator":
            raise UsageError("weights_only keeps activations float; --format qoperator needs "
                             "quantized activations", "drop --format qoperator")
        return ConvertPlan("int8-weights", False, "float-activations")
    if q.dynamic:
        _no_wide_activations(recipe, "--dynamic quantizes activations to 8 bits at run time")
        if q.target:
            raise UsageError(f"target {q.target} is a static int8 preset; --dynamic is another scheme",
                             "drop --dynamic (the target calibrates), or drop the target")
        if q.format == "qoperator":
            raise UsageError(
                "--dynamic already emits integer ops; --format qoperator is for static int8",
                "drop --format, or drop --dynamic and pass --calib/--data",
            )
        return ConvertPlan("int8-dynamic", False, "dynamic")
    if q.format == "qoperator":
        _no_wide_activations(recipe, "--format qoperator has no 16-bit QLinear* operators")
    return ConvertPlan("int8-static", True, q.format)


def _no_wide_activations(recipe: Recipe, why: str) -> None:
    """16-bit activations (the flag, or a [[layer]] activation_bits = 16) are a static QDQ
    choice: any other scheme given them is an error."""
    if recipe.wide_activations():
        raise UsageError(f"--activation-bits 16 cannot apply: {why}",
                         "16-bit activations (A16W8) are static QDQ: drop --activation-bits, or use "
                         "--data/--calib without --dynamic/--bits/--dtype/--format qoperator")


def weight_only_part(recipe: Recipe) -> Recipe | None:
    """The recipe that quantizes only the layers a mixed int8 recipe puts at 2/3/4 bits.

    Overrides keep their order (first match wins); those at 8 bits or more become 32 and a
    final ``*`` = 32 keeps every other node float. None when no override is below 8 bits.
    """
    if not any(rule.bits is not None and rule.bits < 8 for rule in recipe.layer):
        return None
    rules = tuple(r if r.bits < 8 else LayerOverride(r.match, 32)
                  for r in recipe.layer if r.bits is not None)
    return dataclasses.replace(recipe, layer=rules + (LayerOverride("*", 32),))


def speed_warnings(recipe: Recipe, plan: ConvertPlan) -> list[str]:
    """Choices known to run slow on this kind of CPU, said before any work is done."""
    warnings = []
    # Other runtimes (a --target other than the onnxruntime CPU ones) want int8 activations.
    ort_cpu = recipe.quantize.target in ("", "cpu", "cpu-vnni", "cpu-avx2")
    if (plan.kind == "int8-static" and recipe.quantize.activation_type == "int8"
            and recipe.quantize.activation_bits == 8 and ort_cpu):
        warnings.append(SLOW_INT8_ACTIVATIONS)
    if plan.kind == "int8-static" and recipe.wide_activations():
        warnings.append(SLOW_WIDE_ACTIVATIONS)
    if (plan.kind == "weight-only" and plan.format == "matmulnbits"
            and recipe.weight_only.accuracy_level < 4):
        warnings.append(SLOW_ACCURACY_LEVEL.format(level=recipe.weight_only.accuracy_level))
    return warnings


def check_inputs(recipe: Recipe, plan: ConvertPlan, *, calib=None, data=None) -> None:  # noqa: ANN001
    """Recipe and input combinations that cannot work, caught before any model is loaded.

    ``calib``: a calibration table path (or table); ``data``: a sample folder path.
    """
    from pathlib import Path

    from qtool.quant.blockwise import DATA_AWARE

    if calib is not None and data is not None:
        raise UsageError("--calib and --data are alternatives", "pass a table or a data folder, not both")
    if plan.kind == "int8-static" and calib is None and data is None:
        raise UsageError(
            "static int8 needs activation ranges: no --calib table or --data folder given",
            "pass --calib TABLE.json (qtool calibrate) or --data DIR (calibrates inline), "
            "or use --dynamic (no data needed)",
        )
    if calib is not None and plan.kind != "int8-static":
        raise UsageError(
            f"--calib is only used by static int8, not by {plan.kind}",
            "drop --calib, or drop --dynamic / --bits / --dtype",
        )
    if recipe.calibration.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {recipe.calibration.samples}", "0 means every sample")
    wo = recipe.weight_only
    if plan.kind == "weight-only":
        if wo.algorithm in DATA_AWARE and data is None:
            raise UsageError(
                f"--algorithm {wo.algorithm} needs sample inputs",
                "pass --data DIR, or use a data-free algorithm: rtn, mse or hqq",
            )
        if wo.block_size not in (16, 32, 64, 128, 256):
            raise UsageError(f"--block-size {wo.block_size} is not supported", "use 32, 64, 128 or 256")
        if wo.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level must be 0..4, got {wo.accuracy_level}", "4 is the fast path on x86")
    # A missing input is an error (exit 1), as in every command; a bad flag is a usage error.
    if isinstance(calib, (str, Path)) and not Path(calib).exists():
        from qtool.errors import CalibrationError

        raise CalibrationError(f"calibration table not found: {calib}", "make one with: qtool calibrate MODEL --data DIR -o TABLE.json")
    if data is not None and not Path(data).is_dir():
        from qtool.errors import DataError

        raise DataError(f"--data {data} is not a folder", "pass a folder of samples (.npy/.npz/images)")


@dataclass(frozen=True)
class QuantizedInput:
    """What ``convert`` may do with a model that is quantized already (all off: refuse).

    ``store_weights``: fake-quant weights stored as the int8/int4 integers they stand for;
    ``format``: re-target to "qdq" or "qoperator"; ``requantize``: dequantize to float, then
    the normal flow. (A ``--target`` preset belongs here too: it would choose ``format`` and
    add its runtime's conventions to the ``quantized-input`` scheme.)
    """

    store_weights: bool = False
    requantize: bool = False
    format: str | None = None

    @property
    def asked(self) -> bool:
        return self.store_weights or self.requantize or self.format is not None


QUANTIZED_HINT = (
    "choose what to do with it: --store-weights (fake-quant weights stored as int8/int4: the same "
    "outputs, a 3-4x smaller file), --format qoperator|qdq (re-target), or --requantize (dequantize "
    "to float, then quantize as usual); `qtool inspect MODEL` shows what is quantized, and "
    "`qtool eval MODEL --reference FLOAT.onnx --data DIR` compares it with its float parent"
)


def already_quantized(model) -> str | None:  # noqa: ANN001 - ir.Model
    """What in ``model`` says it is quantized already ("fake-quant; weights 3 int8; ..."), or
    None for a float model."""
    from qtool.quantized import recognize

    found = recognize(model)
    if not found.quantized:
        return None
    ops = ", ".join(f"{n} {op}" for op, n in found.ops.most_common(4))
    return f"{found.summary()}; {ops}" if ops else found.summary()


def refuse_quantized(model) -> None:  # noqa: ANN001 - ir.Model
    """ConversionError (exit 1) for a model that is already quantized: never quantize twice."""
    from qtool.errors import ConversionError

    found = already_quantized(model)
    if found:
        raise ConversionError(
            f"the model is already quantized ({found}); converting it again would quantize twice",
            QUANTIZED_HINT,
        )


def plan_quantized_input(model, request: QuantizedInput | None, *, scheme_flags: tuple[str, ...] = ()) -> ConvertPlan | None:  # noqa: ANN001, E501
    """How ``convert`` treats ``model`` given ``request``: None for a float model (the normal
    flow), ``ConvertPlan("requantize", ...)`` to dequantize first, or
    ``ConvertPlan("quantized-input", False, fmt)`` to store weights / re-target (the scheme
    ``quantized-input`` in qtool.pipeline.schemes).

    Raises ConversionError (exit 1) for a quantized model without a request (never quantize
    twice), UsageError for a request that cannot apply: ``scheme_flags`` names the flags given
    that choose how to quantize (--bits, --dynamic, ...), which only --requantize can use.
    """
    from qtool.errors import ConversionError
    from qtool.quantized import recognize

    request = request or QuantizedInput()
    found = recognize(model)
    if request.store_weights and request.requantize:
        raise UsageError("--store-weights keeps the model's quantization, --requantize replaces it",
                         "pick one of the two")
    if not found.quantized:
        flags = [f for f, on in (("--store-weights", request.store_weights),
                                 ("--requantize", request.requantize)) if on]
        if flags:
            raise UsageError(f"{', '.join(flags)}: the model is not quantized (it has no Q/DQ or integer ops)",
                             "drop the flag: a float model is quantized by the normal flow")
        return None
    if request.requantize:
        return ConvertPlan("requantize", False, request.format or "qdq")
    if not request.asked:
        refuse_quantized(model)
    if scheme_flags:
        verb = "chooses" if len(scheme_flags) == 1 else "choose"
        raise UsageError(f"{', '.join(scheme_flags)} {verb} how to quantize, and the model is quantized already",
                         "add --requantize to dequantize it first, or drop them")
    others = sorted(set(found.schemes) - {"qdq", "fake-quant", "qoperator"})
    if others:
        raise ConversionError(
            f"--store-weights and --format apply to QDQ, QOperator and fake-quant models; this one is "
            f"{found.summary()}",
            "its weights are integers already: keep it as it is, or compare it with its float parent "
            "(qtool eval MODEL --reference FLOAT.onnx --data DIR)")
    if request.store_weights and not found.fake_quant:
        raise ConversionError(f"--store-weights: the model has no fake-quant weights ({found.summary()})",
                              "its weights are stored as integers already; --format re-targets it")
    fmt = request.format or "qdq"
    if fmt not in ("qdq", "qoperator"):
        raise UsageError(f"--format {fmt} does not apply to a quantized model", "use --format qdq or qoperator")
    # Re-targeting needs something in the other format (QOperator's leftovers are QDQ groups).
    if not request.store_weights and (
            (fmt == "qdq" and "qoperator" not in found.schemes)
            or (fmt == "qoperator" and found.schemes == ["qoperator"])):
        raise UsageError(f"the model is in the {fmt.upper() if fmt == 'qdq' else 'QOperator'} format already: "
                         "nothing to re-target",
                         "--store-weights stores fake-quant weights; --format qdq|qoperator re-targets")
    return ConvertPlan("quantized-input", False, fmt)
