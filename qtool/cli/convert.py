"""`qtool convert`: int8 (static QDQ / QOperator, dynamic), 4/3/2-bit weight-only, fp16."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import app, console, emit_json, info, progress, settings, warn
from qtool.quant.blockwise import ALGORITHMS

MAX_NOTES = 6  # per pass in the human report; --json has them all


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


# The choices are the library's own lists, so a new algorithm needs no CLI edit.
Algorithm = Enum("Algorithm", {name: name for name in ALGORITHMS}, type=str)


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
        dtype="fp16" if bits == 16 else (dtype.value if dtype is not None else None),
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


def check_flags(*, bits, dtype, dynamic, data: Path | None, samples: int | None) -> None:
    """Flags that contradict each other (a flag that cannot apply is an error, exit 2)."""
    from qtool.errors import UsageError

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
    from qtool.model import check_output_path
    from qtool.pipeline import convert_file, plan_for
    from qtool.pipeline.plan import check_inputs, speed_warnings

    check_flags(bits=bits, dtype=dtype, dynamic=dynamic, data=data, samples=samples)
    r = build_recipe(
        recipe, bits=bits, dtype=dtype, dynamic=dynamic, fmt=fmt, per_channel=per_channel,
        symmetric_activations=symmetric_activations, activation_type=activation_type,
        exclude=exclude, block_size=block_size, symmetric=symmetric, algorithm=algorithm,
        keep_8bit=keep_8bit, accuracy_level=accuracy_level,
        allow_opset_upgrade=allow_opset_upgrade, samples=samples,
    )
    plan = plan_for(r)
    check_inputs(r, plan, calib=calib, data=data)
    if not model.exists():
        from qtool.errors import ModelError

        raise ModelError(f"model file not found: {model}", "check the path")
    check_output_path(output, model)
    for message in speed_warnings(r, plan):
        warn(message)
    report = convert_file(model, output, r, data=data, calib=calib, external_data=external_data,
                          progress=progress)
    for message in report["warnings"]:
        warn(message)
    if json_out:
        emit_json(report)
    if not settings.quiet or not json_out:
        _print_report(report)


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
