"""The conversion flow the CLI and the Python API share: load -> prepare (pre-process,
calibrate or collect statistics) -> the scheme's passes -> save (atomic, verified) ->
fidelity on a sample -> a JSON-ready report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.pipeline.context import Context, StageProgress
from qtool.pipeline.guard import Floor
from qtool.pipeline.plan import ConvertPlan, QuantizedInput
from qtool.pipeline.progress import ProgressFactory, no_progress, stage_advance
from qtool.pipeline.schemes import Converted, run_scheme
from qtool.pipeline.tables import RangeTable

# Measured here (onnxruntime 1.32, CPU provider, 2 threads): dynamic int8 Conv (ConvInteger)
# ran 4.5-10x slower than float on a ResNet-18-shaped CNN and on EfficientNet-Lite0.
SLOW_DYNAMIC_CONV = (
    "{n} Conv node(s) stay float: dynamic int8 Conv (ConvInteger) runs slower than float on "
    "onnxruntime's CPU provider (measured here: 4.5-10x slower); use static int8 (--data/--calib) for CNNs"
)
# bench/convert_int8.py: static QDQ int8 took SmolLM2-135M's perplexity from 46.7 to 21,431
# (onnxruntime's own static: 335,788) and MiniLM's Pearson from 0.638 to 0.607, while dynamic
# int8 with --data (smoothing) kept 47.7 (+2%) and 0.638.
STATIC_TRANSFORMER = (
    "this looks like a transformer ({matmuls} MatMul/Gemm with weights, Softmax, no Conv): static "
    "int8 activations lose accuracy on its outlier channels (measured here: SmolLM2-135M "
    "perplexity 46.7 -> 21,431 static, 47.7 with --dynamic --data); try --dynamic --data DIR"
)
MIN_TRANSFORMER_MATMULS = 4
NOT_SMALLER = 0.95  # weights that keep 95% of the input's bytes compressed nothing
GUARD_HINT = ("keep more layers float (--exclude), try another scheme, lower the floor "
              "(--min-sqnr/--min-agreement), or --write-best to inspect the best candidate")
# What else to try when a scheme compressed nothing: the schemes other than the one that ran.
_OTHER_SCHEMES = {
    "int8-dynamic": "--data DIR for static int8 on CNNs, --bits 4 for MatMul-heavy models, --dtype fp16",
    "weight-only": "--data DIR for static int8 on CNNs, --dtype fp16",
    "int8-static": "--dynamic for MatMul/Gemm models, --bits 4, --dtype fp16",
}
_ANY_SCHEME = "--dynamic for MatMul/Gemm models, --data for static int8 on CNNs, --dtype fp16"


def not_compressed_hint(plan: ConvertPlan) -> str:
    return ("the 'why float' column says why each op stayed float; try another scheme "
            f"({_OTHER_SCHEMES.get(plan.kind, _ANY_SCHEME)})")


# Measured on the corpus: a recognizer whose static candidate met the floor on 3 held-out
# samples lost CER 0.046 on 153 others. Below this many, the guard's verdict is said to be thin.
FEW_HELD_OUT = 8
FEW_HELD_OUT_WARNING = (
    "the guard measured every candidate on only {n} held-out sample(s): a verdict on so few is "
    "noisy; pass --eval-data DIR with more samples (or more --data: every 5th is held out)"
)

def convert_model(
    model: ir.Model,
    recipe: Recipe,
    *,
    table: RangeTable | Mapping | None = None,
    preprocessed: bool = False,
    activations: dict | None = None,
    absmax: dict | None = None,
    on_progress: StageProgress | None = None,
    dataset=None,  # noqa: ANN001 - qtool.data.Dataset
    executor=None,  # noqa: ANN001 - qtool.executors.Executor
    copy: bool = True,
) -> Converted:
    """Convert an in-memory ``model`` as ``recipe`` says (the input is not modified, unless
    ``copy`` is False: then the caller gives ``model`` away and the passes rewrite it in
    place, which saves cloning the graph, 0.15 s for a 7.5 K-node decoder).

    ``table``: a CalibrationTable (or a plain ``{tensor: (lo, hi)}`` mapping) for static
    int8, made on this model. ``preprocessed``: the model has already been through
    qtool.passes.preprocess (as ``prepare`` does before calibrating).
    ``activations``: gptq/awq statistics; ``absmax``: per-channel maxima of MatMul inputs
    for dynamic int8 smoothing (both made by ``prepare``). ``dataset``: the calibration
    samples, for the recovery passes that read them (``[recovery]``). ``executor``: where
    gptq/awq layers run (qtool.executors; None: this process), with identical results.
    """
    context = Context(recipe, model, table=table, preprocessed=preprocessed, activations=activations,
                      absmax=absmax, on_progress=on_progress, dataset=dataset, executor=executor)
    return run_scheme(model, context, copy=copy)


@dataclass
class Prepared:
    """A model ready for its scheme's passes, and what was measured on the data."""

    model: ir.Model
    table: RangeTable | None = None
    preprocessed: bool = False
    activations: dict | None = None
    absmax: dict | None = None
    reports: list[PassReport] = field(default_factory=list)
    dataset: object | None = None  # the calibration samples, when recovery reads them


def prepare(
    source: ir.Model,
    model_path: str | os.PathLike | None,
    recipe: Recipe,
    plan: ConvertPlan,
    *,
    data: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    progress: ProgressFactory = no_progress,
) -> Prepared:
    """What a scheme needs before its passes: a calibration table (loaded, or calibrated on
    the pre-processed graph from ``data``), smoothing maxima for dynamic int8 with data,
    gptq/awq statistics. ``source`` is not modified."""
    if plan.kind == "int8-static":
        if calib is not None:
            from qtool.calibration.table import CalibrationTable

            if recipe.recovery.passes:
                from qtool.errors import UsageError
                from qtool.passes.recovery import NEEDS_DATA_HINT

                raise UsageError("recovery (--recover / [recovery]) cannot use a calibration table made "
                                 "beforehand: it reads the samples and moves the ranges", NEEDS_DATA_HINT)

            return Prepared(source, table=CalibrationTable.load(calib))
        return _calibrated(source, data, recipe, progress)
    if plan.kind == "int8-dynamic" and data is not None:
        from qtool.passes.dynamic import collect_channel_absmax, smoothing_inputs
        from qtool.passes.preprocess import preprocess

        work = source.clone()
        report = preprocess(work)
        dataset = as_dataset(data, work, recipe)
        with progress("activation ranges", None, "samples"):
            absmax = collect_channel_absmax(work, dataset, smoothing_inputs(work, recipe),
                                            limit=recipe.calibration.samples)
        return Prepared(work, preprocessed=True, absmax=absmax, reports=[report])
    from qtool.quant.blockwise import DATA_AWARE

    if plan.kind == "weight-only" and recipe.weight_only.algorithm in DATA_AWARE:
        from qtool.passes.weight_only import collect_weight_only_stats

        dataset = as_dataset(data, source, recipe)
        stats = collect_weight_only_stats(model_path if model_path is not None else source, dataset,
                                          recipe, limit=recipe.calibration.samples)
        return Prepared(source, activations=stats)
    return Prepared(source)


def calibrate(
    model: str | os.PathLike | ir.Model,
    data: str | os.PathLike,
    recipe: Recipe,
    *,
    shard: tuple[int, int] = (0, 1),
    on_progress=None,  # noqa: ANN001 - Callable[[qtool.calibration.Progress], None]
    threads: int = 0,
):
    """Observe the activations ``recipe`` quantizes over the samples in ``data``; return the
    CalibrationTable (see qtool.calibration).

    A path is loaded and pre-processed exactly as conversion will (BatchNorm and scale
    folding, Pad fusion...), so the table holds the ranges of the tensors conversion
    quantizes, under the fingerprint of the pre-processed graph. An ``ir.Model`` is taken
    as already prepared (its value types must be known) and is not modified.
    """
    from qtool.calibration import calibrate_prepared
    from qtool.errors import CalibrationError
    from qtool.passes.select import folded_ranges, select_nodes

    if not isinstance(model, ir.Model):
        from qtool.model import load
        from qtool.passes.preprocess import preprocess
        from qtool.runtime import infer_types

        model = load(model)
        preprocess(model)  # our own copy: safe to rewrite
        infer_types(model)
    from qtool.passes.control_flow import split_observable

    # Tensors inside If/Loop/Scan branches cannot be returned by onnxruntime: they stay
    # float, with the reason in the table, instead of failing calibration.
    names, unobserved = split_observable(model, select_nodes(model, recipe).activation_tensors)
    if not names and not unobserved:
        raise CalibrationError(
            "the recipe quantizes no node of this model, so there is nothing to calibrate",
            "check the recipe's op_types/exclude, or `qtool inspect MODEL` for candidates",
        )
    # A pre-activation output read only by its Relu/Clip takes that activation's statistics
    # (qtool.passes.select.folded_ranges): the same table, without returning it from the model.
    aliases = folded_ranges(model, names, recipe.quantize.exclude)
    table = calibrate_prepared(model, data, recipe, [n for n in names if n not in aliases], shard=shard,
                               on_progress=on_progress, threads=threads)
    if aliases:
        observed, skipped = dict(table.tensors), table.info.get("skipped", {})
        table.tensors.clear()  # refilled in graph order, as a table of every name would be
        for name in names:
            source = aliases.get(name, name)
            if source in observed:
                table.tensors[name] = observed[source]
            elif source != name and source in skipped:  # the activation held +-inf
                skipped[name] = f"read only by {source}, which {skipped[source]}"
    if unobserved:
        table.info["skipped"] = {**unobserved, **table.info.get("skipped", {})}
    return table


def as_dataset(data, model: ir.Model, recipe: Recipe):  # noqa: ANN001, ANN201 - qtool.data.Dataset
    """``data`` opened as a Dataset for ``model``'s inputs (a Dataset passes through)."""
    from qtool.data import Dataset, input_specs

    return data if isinstance(data, Dataset) else Dataset(data, input_specs(model), recipe.preprocess)


def _calibrated(source: ir.Model, data, recipe: Recipe, progress: ProgressFactory) -> Prepared:
    from qtool.passes.preprocess import preprocess

    work = source.clone()
    reports = [preprocess(work)]
    dataset = None
    if recipe.recovery.passes:
        from qtool.pipeline.schemes import BEFORE_CALIBRATION, run_passes

        dataset = data = as_dataset(data, work, recipe)
        with progress("recovery before calibration", None, None):
            reports += run_passes(work, Context(recipe, work, preprocessed=True, dataset=dataset),
                                  BEFORE_CALIBRATION)
    with progress("calibrating", None, "samples") as advance:
        last = [0]

        def on_batch(p) -> None:  # noqa: ANN001 - qtool.calibration.Progress
            advance(p.done - last[0])
            last[0] = p.done

        table = calibrate(work, data, recipe, on_progress=on_batch)
    return Prepared(work, table=table, preprocessed=True, reports=reports, dataset=dataset)


def convert_file(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    recipe: Recipe,
    *,
    data: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    external_data: bool = False,
    progress: ProgressFactory = no_progress,
    guard: Floor | None = None,
    eval_data: str | os.PathLike | None = None,
    auto: bool = False,
    budget_s: float | None = None,
    write_best: bool = False,
    quantized_input: QuantizedInput | None = None,
    runtime=None,  # noqa: ANN001 - qtool.runtime.Runtime the guard times candidates on
    executor=None,  # noqa: ANN001 - qtool.executors.Executor for gptq/awq layer work
    loaded: ir.Model | None = None,
) -> dict:
    """Load, prepare, convert, save (atomic, verified), measure; return the report.

    The report is what ``qtool convert --json`` prints: sizes, per-op summary, every pass's
    counts and notes, fidelity on one sample when ``data`` is given, ``warnings``, and
    ``passed``. ``guard`` (a Floor) runs the guard whenever ``data`` is given without
    ``calib``. ``auto``: the user chose no scheme, so the default may adapt (per-tensor
    weights below opset 13; with the guard, dynamic int8 is a candidate too). With ``guard``
    (a Floor) and ``data``, candidates are measured on held-out samples and repaired
    (qtool.pipeline.auto); when
    nothing meets the floor, or nothing was quantized, ``passed`` is False and ``output``
    is written only with ``write_best``. An already-quantized model is refused unless
    ``quantized_input`` says what to do with it (qtool.pipeline.plan.plan_quantized_input).
    ``loaded``: ``model_path`` as already loaded by the caller, so a large model is not
    parsed twice; it is handed over (the conversion may rewrite it in place).
    """
    from qtool.model import load, model_size_bytes
    from qtool.pipeline.plan import plan_quantized_input

    model_path = Path(model_path)
    t0 = time.perf_counter()
    source = load(model_path) if loaded is None else loaded
    in_size = model_size_bytes(model_path, source)
    input_plan = plan_quantized_input(source, quantized_input)
    input_reports: list[PassReport] = []
    if input_plan is not None and input_plan.kind == "quantized-input":
        from qtool.pipeline.quantized_input import convert_quantized

        return convert_quantized(source, model_path, output, recipe, input_plan, data=data,
                                 external_data=external_data, started=t0)
    if input_plan is not None:  # requantize: the normal flow from the dequantized graph
        from qtool.pipeline.quantized_input import dequantized

        source, dequantize_report = dequantized(source)
        input_reports.append(dequantize_report)
    return _convert_loaded(source, model_path, output, recipe, data=data, calib=calib,
                           external_data=external_data, progress=progress, guard=guard,
                           eval_data=eval_data, auto=auto, budget_s=budget_s, write_best=write_best,
                           started=t0, input_reports=input_reports, runtime=runtime, executor=executor,
                           in_size=in_size, owned=True)


def _convert_loaded(source: ir.Model, model_path: Path, output, recipe: Recipe, *, data, calib,  # noqa: ANN001
                    external_data: bool, progress: ProgressFactory, guard: Floor | None, eval_data,
                    auto: bool, budget_s: float | None, write_best: bool, started: float,
                    input_reports: list[PassReport], runtime=None, executor=None,  # noqa: ANN001
                    in_size: int | None = None, owned: bool = False) -> dict:
    """convert_file from the loaded (float) model on: guard or one conversion, save, measure.
    ``in_size``: the input's bytes on disk, when known (else measured from the file).
    ``owned``: ``source`` is this call's to rewrite (one conversion then needs no copy)."""
    from qtool.model import add_provenance, model_size_bytes, save, weight_bytes
    from qtool.pipeline.plan import plan_for

    t0 = started
    guard_report, failure = None, None
    # measured before a conversion that may rewrite ``source`` in place
    input_weights, input_external = weight_bytes(source), has_external_data(source)
    if guard is not None and data is not None and calib is None:
        from qtool.pipeline.auto import DEFAULT_BUDGET_SECONDS, guarded

        outcome = guarded(source, model_path, recipe, data=data, eval_data=eval_data, floor=guard,
                          auto=auto, budget_s=budget_s or DEFAULT_BUDGET_SECONDS, progress=progress,
                          runtime=runtime, executor=executor)
        guard_report = outcome.to_dict(guard)
        if outcome.chosen is None:
            failure = _guard_failure(outcome)
        converted = outcome.chosen or outcome.best
        if outcome.best_attempt is not None:
            recipe = outcome.best_attempt.recipe
        prep_reports = outcome.reports
    else:
        if auto and plan_for(recipe).kind == "int8-static":
            from qtool.pipeline.auto import default_static

            recipe, _ = default_static(recipe, source, samples=data is not None and calib is None)
        converted, prep_reports = _convert_once(source, model_path, recipe, data, calib, progress, executor,
                                                owned=owned)
    prep_reports = [*input_reports, *prep_reports]
    plan = plan_for(recipe)
    if in_size is None:
        in_size = model_size_bytes(model_path)
    report = {
        "model": str(model_path),
        "output": None,
        "recipe": recipe.name,
        "mode": plan.kind,
        "format": plan.format,
        "seconds": None,
        "size_bytes": {"input": in_size, "output": None},
        "size_ratio": None,
        "ops": converted.summary.to_dict() if converted is not None else {},
        "passes": [{"name": p.name, "counts": p.counts, "notes": p.notes[:50]}
                   for p in prep_reports + (converted.reports if converted is not None else [])],
        "fidelity": None,
        "warnings": scheme_warnings(plan, converted) if converted is not None else [],
        "passed": failure is None,
        "failure": failure,
        "hint": GUARD_HINT if failure else None,
    }
    if guard_report is not None:
        report["guard"] = guard_report
        if (few := guard_report["holdout_samples"]) < FEW_HELD_OUT:
            report["warnings"].append(FEW_HELD_OUT_WARNING.format(n=few))
    if converted is not None and failure is None:
        failure = _not_compressed(converted, input_weights, plan)
        report["passed"], report["failure"] = failure is None, failure
        report["hint"] = not_compressed_hint(plan) if failure else None
    if converted is None or (failure is not None and not write_best):
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return report
    add_provenance(converted.model, recipe.to_dict(), source=str(model_path))
    saved = save(converted.model, output, input_path=model_path,
                 external_data=True if external_data or input_external else None)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    out_size = saved.bytes_written
    report.update(output=str(saved.path), size_bytes={"input": in_size, "output": out_size},
                  size_ratio=round(out_size / in_size, 4) if in_size else None)
    if (warning := size_warning(in_size, out_size)) is not None:
        report["warnings"].append(warning)
    if data is not None:
        from qtool.pipeline.fidelity import first_sample_fidelity

        report["fidelity"] = first_sample_fidelity(model_path, saved.path, data, recipe)
    return report


def _convert_once(source: ir.Model, model_path: Path, recipe: Recipe, data, calib,  # noqa: ANN001
                  progress: ProgressFactory, executor=None, *,  # noqa: ANN001
                  owned: bool = False) -> tuple[Converted, list[PassReport]]:
    """The recipe's scheme, once, unmeasured (--no-guard, --calib, or no data). ``owned``:
    ``source`` may be rewritten in place."""
    from qtool.pipeline.plan import plan_for

    prepared = prepare(source, model_path, recipe, plan_for(recipe), data=data, calib=calib,
                       progress=progress)
    with progress("converting", None, None) as advance:
        converted = convert_model(
            prepared.model, recipe, table=prepared.table, preprocessed=prepared.preprocessed,
            activations=prepared.activations, absmax=prepared.absmax, on_progress=stage_advance(advance),
            dataset=prepared.dataset, executor=executor,
            copy=prepared.model is source and not owned,  # prepare's working copy is ours too
        )
    return converted, prepared.reports


def _guard_failure(outcome) -> str:  # noqa: ANN001 - GuardOutcome
    best = outcome.best_attempt
    if best is None:
        errors = "; ".join(f"{a.label}: {a.error}" for a in outcome.attempts if a.error)
        return f"no candidate could be converted ({errors or 'none tried'})"
    if all(a.error and a.error.startswith("nothing was compressed") for a in outcome.attempts):
        return f"no candidate compressed anything ({len(outcome.attempts)} tried; {best.label}: {best.error})"
    missing = best.error or "; ".join(best.shortfalls)
    return f"below the floor after {len(outcome.attempts)} attempt(s); best was {best.label}: {missing}"


def _not_compressed(converted: Converted, input_weight_bytes: int, plan: ConvertPlan) -> str | None:
    """Why the result is no compression at all (nothing quantized, or weights that grew), or
    None when it is one. A file larger only by the quantize/dequantize nodes' own bytes (a toy
    model) is a warning, given with the sizes (``size_warning``)."""
    from qtool.model import weight_bytes

    quantized = sum(converted.summary.quantized.values())
    out = weight_bytes(converted.model)
    # The summary matches nodes by name; the weights' size is the ground truth.
    if quantized == 0 and plan.kind != "fp16" and out >= NOT_SMALLER * input_weight_bytes:
        from qtool.pipeline.summary import GENERIC_REASONS

        # the ops the scheme handles, with why each stayed float (not every Add and Concat)
        reasons = "; ".join(f"{op}: {', '.join(r for r in row['reasons'] if r not in GENERIC_REASONS)}"
                            for op, row in converted.summary.to_dict().items()
                            if set(row["reasons"]) - GENERIC_REASONS)
        return f"nothing was quantized ({reasons or 'no op this scheme handles'})"
    if input_weight_bytes and NOT_SMALLER * input_weight_bytes <= out <= input_weight_bytes:
        # Something was quantized, but not what holds the bytes (a TTS model's --dynamic
        # took only its phoneme embedding: 1.00x).
        return (f"almost nothing was compressed: the weights are {out / input_weight_bytes:.2f}x of the input's "
                f"({out / 1e6:.3f} of {input_weight_bytes / 1e6:.3f} MB)")
    if out > input_weight_bytes:
        return (f"the converted weights ({out / 1e6:.3f} MB) are larger than the input's "
                f"({input_weight_bytes / 1e6:.3f} MB)")
    return None


def size_warning(in_size: int, out_size: int) -> str | None:
    """Said when the written file is not smaller than its input."""
    if out_size < in_size:
        return None
    return (f"the written model ({out_size / 1e6:.3f} MB) is not smaller than its input "
            f"({in_size / 1e6:.3f} MB): in a model this small the quantize/dequantize nodes' own "
            "bytes outweigh what int8 weights save")


def scheme_warnings(plan: ConvertPlan, converted: Converted) -> list[str]:
    """What the user should know about this scheme on this graph (measured slow or lossy)."""
    summary = converted.summary
    warnings = []
    matmuls = summary.count("MatMul") + summary.count("Gemm")
    if (plan.kind == "int8-static" and summary.count("Softmax") and not summary.count("Conv")
            and matmuls >= MIN_TRANSFORMER_MATMULS):
        warnings.append(STATIC_TRANSFORMER.format(matmuls=matmuls))
    if plan.kind == "int8-dynamic" and summary.float_.get("Conv", 0):
        warnings.append(SLOW_DYNAMIC_CONV.format(n=summary.float_["Conv"]))
    return warnings


def has_external_data(model: ir.Model) -> bool:
    """Whether the loaded input keeps weights in data files: its output should too (writing
    a big model inline builds the whole protobuf in memory)."""
    from qtool.model import iter_initializers

    return any(isinstance(t, ir.ExternalTensor) for t in iter_initializers(model))
