"""`qtool convert`: int8 (static QDQ / QOperator, dynamic), 4/3/2-bit weight-only, fp16."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import app, console, emit_json, info, progress, settings, warn

# Measured here (onnxruntime 1.32, CPU provider, 2 threads, AVX-512 VNNI; bench/convert_int8.py
# and bench/convert_lowbit.py): ResNet-18-shaped CNN fp32 96.5 ms; QDQ with int8 activations
# 104 ms; with uint8 activations 37-40 ms. Dynamic int8 (ConvInteger) on it: 433 ms, and on
# EfficientNet-Lite0 250 ms vs 25 ms fp32. MatMulNBits int4 decoder stack, one token:
# accuracy_level 0 277 ms, accuracy_level 4 82 ms.
SLOW_INT8_ACTIVATIONS = (
    "int8 activations in QDQ are not fused into onnxruntime's fast x86 kernels (measured here "
    "on a ResNet-18-shaped CNN: 104 ms vs 97 ms fp32, and 37-40 ms with uint8 activations); "
    "--activation-type uint8 is the fast choice on this CPU"
)
SLOW_ACCURACY_LEVEL = (
    "MatMulNBits accuracy_level {level} computes in float on the CPU provider (measured here: "
    "3.4x slower per token than --accuracy-level 4, which uses int8 activations)"
)
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
MAX_NOTES = 6  # per pass in the human report; --json has them all


def looks_like_transformer(summary) -> int:
    """The number of weight MatMul/Gemm nodes when the converted graph has the shape of a
    transformer (Softmax, no Conv, at least MIN_TRANSFORMER_MATMULS of them), else 0."""
    def count(op: str) -> int:
        return summary.quantized.get(op, 0) + summary.float_.get(op, 0)

    matmuls = count("MatMul") + count("Gemm")
    if count("Softmax") and not count("Conv") and matmuls >= MIN_TRANSFORMER_MATMULS:
        return matmuls
    return 0


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


class Algorithm(str, Enum):
    rtn = "rtn"
    mse = "mse"
    hqq = "hqq"
    gptq = "gptq"
    awq = "awq"


def _default_preset(dtype: DType | None, bits: int | None, dynamic: bool | None) -> str | None:
    if dtype == DType.fp16:
        return "fp16"
    if bits in (2, 3, 4):
        return "int4-weight-only"
    if dynamic:
        return "int8-dynamic"
    return "int8-static"


def build_recipe(
    recipe: str | None, *, bits, dtype, dynamic, fmt, per_channel, symmetric_activations,
    activation_type, exclude, block_size, symmetric, algorithm, keep_8bit, accuracy_level,
    allow_opset_upgrade, samples,
):
    """The recipe with the flags that were given applied on top (None: keep the recipe's)."""
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
        dtype=dtype.value if dtype is not None else None,
        dynamic=dynamic,
        format=q_format,
        per_channel=per_channel,
        symmetric_activations=symmetric_activations,
        activation_type=activation_type.value if activation_type is not None else None,
        exclude=tuple(r.quantize.exclude) + tuple(exclude) if exclude else None,
        allow_opset_upgrade=allow_opset_upgrade or None,
    )
    if dtype == DType.fp16 and bits is None:
        r = r.override("quantize", bits=16)
    if r.quantize.dtype == "int" and r.quantize.bits == 16:
        r = r.override("quantize", bits=8)
    r = r.override(
        "weight_only",
        block_size=block_size,
        symmetric=symmetric,
        algorithm=algorithm.value if algorithm is not None else None,
        keep_8bit=tuple(r.weight_only.keep_8bit) + tuple(keep_8bit) if keep_8bit else None,
        accuracy_level=accuracy_level,
        format=wo_format,
    )
    return r.override("calibration", samples=samples)


def check_flags(r, plan, *, calib: Path | None, data: Path | None, samples: int | None) -> None:
    """Flag combinations that cannot work, caught before any model is loaded (exit 2)."""
    from qtool.errors import UsageError

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
    if samples is not None and data is None:
        raise UsageError("--samples needs --data", "add --data DIR, or drop --samples")
    if samples is not None and samples < 0:
        raise UsageError(f"--samples must be >= 0, got {samples}", "0 means every sample")
    wo = r.weight_only
    if plan.kind == "weight-only":
        if wo.algorithm in ("gptq", "awq") and data is None:
            raise UsageError(
                f"--algorithm {wo.algorithm} needs sample inputs",
                "pass --data DIR, or use a data-free algorithm: rtn, mse or hqq",
            )
        if wo.block_size not in (16, 32, 64, 128, 256):
            raise UsageError(f"--block-size {wo.block_size} is not supported", "use 32, 64, 128 or 256")
        if wo.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level must be 0..4, got {wo.accuracy_level}", "4 is the fast path on x86")
    if calib is not None and not calib.exists():
        raise UsageError(f"calibration table not found: {calib}", "make one with: qtool calibrate MODEL --data DIR -o TABLE.json")
    if data is not None and not data.is_dir():
        raise UsageError(f"--data {data} is not a folder", "pass a folder of samples (.npy/.npz/images)")


@app.command("convert")
def convert_command(
    model: Path = typer.Argument(..., help="The float .onnx model (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the converted model."),
    bits: int = typer.Option(None, "--bits", help="8 (int8), or 4/3/2 (weight-only blocks)."),
    dtype: DType = typer.Option(None, "--dtype", help="int, or fp16 for half precision."),
    calib: Path = typer.Option(None, "--calib", help="Calibration table (qtool calibrate)."),
    data: Path = typer.Option(None, "--data", help="Sample folder: calibrate inline (static int8), "
                              "smoothing statistics (dynamic), gptq/awq statistics, and the fidelity check."),
    samples: int = typer.Option(None, "--samples", help="Calibrate on the first N samples (0: all)."),
    dynamic: bool = typer.Option(None, "--dynamic", help="Dynamic int8: no data needed; with --data, outlier smoothing."),
    fmt: Format = typer.Option(None, "--format", help="qdq | qoperator (int8), matmulnbits | qdq (4-bit)."),
    per_channel: bool = typer.Option(None, "--per-channel/--per-tensor", help="int8 weight granularity."),
    symmetric_activations: bool = typer.Option(None, "--symmetric-activations", help="Symmetric activation ranges."),
    activation_type: ActType = typer.Option(None, "--activation-type", help="uint8 (fast on x86) or int8."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Node name, glob or op type to keep in float (repeatable)."),
    recipe: str = typer.Option(None, "--recipe", help="Preset name or .toml path [default: by mode]."),
    block_size: int = typer.Option(None, "--block-size", help="Weight-only block size: 32, 64, 128, 256."),
    symmetric: bool = typer.Option(None, "--symmetric/--asymmetric", help="Weight-only block symmetry."),
    algorithm: Algorithm = typer.Option(None, "--algorithm", help="Weight-only: rtn, mse, hqq, gptq, awq."),
    keep_8bit: list[str] = typer.Option(None, "--keep-8bit", help="Weight-only: name pattern kept at 8 bits (repeatable)."),
    accuracy_level: int = typer.Option(None, "--accuracy-level", help="MatMulNBits accuracy level 0-4."),
    external_data: bool = typer.Option(
        False, "--external-data",
        help="Write weights to OUT.data (the default when MODEL keeps its weights in a data file, or "
             "above protobuf's 2 GB: the output then streams to disk instead of being built in memory).",
    ),
    allow_opset_upgrade: bool = typer.Option(False, "--allow-opset-upgrade", help="Let qtool raise the opset when the format needs it."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantize or half a model: int8 static/dynamic, 4/3/2-bit weight-only, or fp16.

    Static int8 needs ranges: --calib TABLE.json, or --data DIR to calibrate inline.
    The output is verified to load in onnxruntime; with --data, one sample is run through
    both models and cosine similarity and SQNR of the outputs are printed.

    \b
    \b
    Examples:
      qtool convert m.onnx -o m.int8.onnx --data calib/
      qtool convert llm.onnx -o llm.int8.onnx --dynamic --exclude lm_head
      qtool convert llm.onnx -o llm.int4.onnx --bits 4 --block-size 32
      qtool convert m.onnx -o m.fp16.onnx --dtype fp16
    """
    from qtool.convert import plan_for
    from qtool.model import check_output_path

    if bits is not None and bits not in (2, 3, 4, 8, 16):
        from qtool.errors import UsageError

        raise UsageError(f"--bits {bits} is not supported", "use 8, 4, 3 or 2 (or --dtype fp16)")
    r = build_recipe(
        recipe, bits=bits, dtype=dtype, dynamic=dynamic, fmt=fmt, per_channel=per_channel,
        symmetric_activations=symmetric_activations, activation_type=activation_type,
        exclude=exclude, block_size=block_size, symmetric=symmetric, algorithm=algorithm,
        keep_8bit=keep_8bit, accuracy_level=accuracy_level,
        allow_opset_upgrade=allow_opset_upgrade, samples=samples,
    )
    plan = plan_for(r)
    check_flags(r, plan, calib=calib, data=data, samples=samples)
    if not model.exists():
        from qtool.errors import ModelError

        raise ModelError(f"model file not found: {model}", "check the path")
    check_output_path(output, model)
    _speed_warnings(r, plan)
    report = run_convert(model, output, r, plan, calib=calib, data=data, external_data=external_data)
    if json_out:
        emit_json(report)
    if not settings.quiet or not json_out:
        _print_report(report)


def _speed_warnings(r, plan) -> None:
    q = r.quantize
    if plan.kind == "int8-static" and q.activation_type == "int8":
        warn(SLOW_INT8_ACTIVATIONS)
    if plan.kind == "weight-only" and plan.format == "matmulnbits" and r.weight_only.accuracy_level < 4:
        warn(SLOW_ACCURACY_LEVEL.format(level=r.weight_only.accuracy_level))


def run_convert(model_path: Path, output: Path, r, plan, *, calib, data, external_data) -> dict:
    """Load, (calibrate), convert, save, verify, measure; return the report dictionary."""
    from qtool.convert import convert_with_summary
    from qtool.model import add_provenance, load, model_size_bytes, save

    t0 = time.perf_counter()
    source = load(model_path)
    table = None
    preprocessed = False
    reports = []
    work = source
    activations = None
    absmax = None
    if plan.kind == "int8-static":
        if calib is not None:
            from qtool.calibration.table import CalibrationTable

            table = CalibrationTable.load(calib)
        else:
            from qtool.calibration import calibrate
            from qtool.passes.preprocess import preprocess

            work = source.clone()
            reports.append(preprocess(work))
            preprocessed = True
            with progress("calibrating", None) as advance:
                last = [0]

                def on_batch(p) -> None:
                    advance(p.done - last[0])
                    last[0] = p.done

                table = calibrate(work, data, r, on_progress=on_batch)
    elif plan.kind == "int8-dynamic" and data is not None:
        from qtool.data import Dataset, input_specs
        from qtool.passes.dynamic import collect_channel_absmax, smoothing_inputs
        from qtool.passes.preprocess import preprocess

        work = source.clone()
        reports.append(preprocess(work))
        preprocessed = True
        dataset = Dataset(data, input_specs(work), r.preprocess)
        with progress("activation ranges", None):
            absmax = collect_channel_absmax(work, dataset, smoothing_inputs(work, r),
                                            limit=r.calibration.samples)
    elif plan.kind == "weight-only" and r.weight_only.algorithm in ("gptq", "awq"):
        from qtool.data import Dataset, input_specs
        from qtool.passes.weight_only import collect_weight_only_stats

        dataset = Dataset(data, input_specs(source), r.preprocess)
        activations = collect_weight_only_stats(model_path, dataset, r, limit=r.calibration.samples)

    with progress("converting", None) as advance:
        seen = [0]

        def on_progress(stage: str, done: int, total: int) -> None:
            advance(done - seen[0])
            seen[0] = done

        converted, more, summary = convert_with_summary(
            work, r, table=table, on_progress=on_progress, preprocessed=preprocessed,
            activations=activations, absmax=absmax,
        )
    reports += more
    add_provenance(converted, r.to_dict(), source=str(model_path))
    saved = save(converted, output, input_path=model_path,
                 external_data=True if external_data or _has_external_data(source) else None)
    seconds = time.perf_counter() - t0
    in_size, out_size = model_size_bytes(model_path), saved.bytes_written  # the output: what save wrote
    result = {
        "model": str(model_path),
        "output": str(saved.path),
        "recipe": r.name,
        "mode": plan.kind,
        "format": plan.format,
        "seconds": round(seconds, 3),
        "size_bytes": {"input": in_size, "output": out_size},
        "size_ratio": round(out_size / in_size, 4) if in_size else None,
        "ops": summary.to_dict(),
        "passes": [{"name": p.name, "counts": p.counts, "notes": p.notes[:50]} for p in reports],
        "fidelity": None,
    }
    if data is not None:
        result["fidelity"] = _fidelity(model_path, saved.path, data, r)
    if plan.kind == "int8-static" and (matmuls := looks_like_transformer(summary)):
        warn(STATIC_TRANSFORMER.format(matmuls=matmuls))
    if plan.kind == "int8-dynamic":
        conv_float = summary.float_.get("Conv", 0)
        if conv_float:
            warn(SLOW_DYNAMIC_CONV.format(n=conv_float))
    return result


def _has_external_data(model) -> bool:
    """Whether the loaded input keeps weights in data files: its output should too (writing
    a big model inline builds the whole protobuf in memory)."""
    import onnx_ir as ir

    from qtool.model import iter_initializers

    return any(isinstance(t, ir.ExternalTensor) for t in iter_initializers(model))


def _fidelity(reference: Path, candidate: Path, data: Path, r) -> dict | None:
    """Cosine / SQNR of the outputs on the first sample of ``data``."""
    import onnxruntime as ort

    from qtool.convert import fidelity
    from qtool.data import Dataset, input_specs
    from qtool.model import load

    dataset = Dataset(data, input_specs(load(reference)), r.preprocess)
    if len(dataset) == 0:
        return None
    feed = dataset.load_sample(0)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    outs = []
    for path in (reference, candidate):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, feed))
    ref = [o for o in outs[0] if getattr(o, "dtype", None) is not None and o.dtype.kind == "f"]
    cand = [o for o in outs[1] if getattr(o, "dtype", None) is not None and o.dtype.kind == "f"]
    if not ref or len(ref) != len(cand):
        return None
    return fidelity(ref, cand)


def _print_report(report: dict) -> None:
    ops = report["ops"]
    if ops:
        table = Table(title=f"{report['mode']} ({report['format']})", title_justify="left", show_edge=False)
        for col in ("op", "quantized", "float", "why float"):
            table.add_column(col, justify="right" if col in ("quantized", "float") else "left")
        for op, row in ops.items():
            reasons = "; ".join(f"{escape(k)} ({v})" for k, v in row["reasons"].items())
            table.add_row(op, str(row["quantized"]), str(row["float"]), reasons)
        console.print(table)
    for p in report["passes"]:
        counts = ", ".join(f"{k} {v}" for k, v in p["counts"].items() if v)
        if counts:
            info(f"{p['name']}: {escape(counts)}")
        for note in p["notes"][:MAX_NOTES]:
            info(f"{p['name']}: {escape(note)}")
        if len(p["notes"]) > MAX_NOTES:
            info(f"{p['name']}: {len(p['notes']) - MAX_NOTES} more notes in --json")
    sizes = report["size_bytes"]
    info(f"wrote {escape(report['output'])}: {sizes['output'] / 1e6:.2f} MB "
         f"({report['size_ratio']:.2f}x of {sizes['input'] / 1e6:.2f} MB) in {report['seconds']:.1f} s")
    fid = report.get("fidelity")
    if fid:
        info(f"fidelity on one sample: cosine {fid['cosine']:.5f}, SQNR {fid['sqnr_db']:.1f} dB")
