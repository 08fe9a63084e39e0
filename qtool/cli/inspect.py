"""`qtool inspect`: what is in a model, and what this machine offers quantized kernels."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import app, console, emit_json, settings


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.1f} {prefix}{unit}"
        n /= 1024
    return f"{n} {unit}"


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


@app.command("inspect")
def inspect_command(
    model: Path = typer.Argument(..., help="The .onnx model (external data is not read)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    hw: bool = typer.Option(
        False, "--hw", help="Also report this CPU's int8/int4 features, which `convert --target cpu` "
        "variant applies (cpu-vnni, or cpu-avx2 = 7-bit weights where VNNI is missing), onnxruntime "
        "and qtool's kernels."
    ),
) -> None:
    """Show a model's inputs, outputs, opsets, ops, parameters and quantization candidates.

    Reads the graph and tensor metadata only: weights stored as external data stay on disk,
    so inspecting a multi-gigabyte model is instant.

    An already-quantized model is recognised: its schemes (qdq, fake-quant as QAT exports
    write it, qoperator, dynamic, matmulnbits), the bit widths of its weights and activations,
    and the share of weights and multiply-accumulates still computed in float.

    Example: qtool inspect examples/digits_cnn.onnx --hw
    """
    from qtool.model import load
    from qtool.summary import summarize

    loaded = load(model)
    summary = summarize(loaded, model)
    summary["quantization"] = _quantization(loaded)
    report = {"model": summary}
    if hw:
        from qtool.hardware import hardware_report

        report["hardware"] = hardware_report()
    if json_out:
        emit_json(report)
    if not settings.quiet or not json_out:
        _print_summary(summary)
        if hw:
            _print_hardware(report["hardware"])


def _quantization(model) -> dict:  # noqa: ANN001 - ir.Model
    """qtool.quantized's reading of ``model``, with shapes inferred so MACs count positions."""
    from qtool.quantized import recognize
    from qtool.runtime import infer_types

    try:
        infer_types(model)
    except Exception:  # noqa: BLE001 - shapes only refine the MAC counts; the graph is read anyway
        pass
    return recognize(model).to_dict()


def _print_quantization(q: dict) -> None:
    if not q["quantized"]:
        return
    table = Table(title=f"already quantized: {escape(', '.join(q['schemes']))}", title_justify="left",
                  show_edge=False)
    for col in ("compute", "nodes", "weights", "MACs"):
        table.add_column(col, justify="left" if col == "compute" else "right")
    for kind, t in q["compute"].items():
        table.add_row(escape(kind), str(t["nodes"]), _count(t["params"]), _count(t["macs"]))
    console.print(table)
    types = ", ".join(f"{n} {t}" for t, n in q["weight_types"].items()) or "none"
    console.print(f"weights: {escape(types)}; activations: {escape(', '.join(q['activation_types']) or 'float')}")
    if q["float_weight_share"] is not None:
        console.print(f"still float: {q['float_weight_share']:.1%} of weights, {q['float_mac_share']:.1%} of MACs")
    if q["fake_quant_weights"]:
        console.print(f"{q['fake_quant_weights']} fake-quant weight(s) stored as float: "
                      "qtool convert MODEL -o OUT --store-weights stores them as integers")


def _print_summary(s: dict) -> None:
    opsets = ", ".join(f"{d} {v}" for d, v in s["opsets"].items())
    console.print(f"[bold]{escape(str(s['path']))}[/bold]  IR {s['ir_version']}, opset {opsets}"
                  + (f", from {escape(s['producer'])}" if s["producer"] else ""))
    io = Table(title="inputs and outputs", title_justify="left", show_edge=False)
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in s[kind]:
            shape = "?" if v["shape"] is None else "[" + ", ".join(map(str, v["shape"])) + "]"
            io.add_row(kind[:-1], escape(v["name"]), v["dtype"], shape)
    console.print(io)

    params = Table(title=f"parameters: {_count(s['parameters'])}", title_justify="left", show_edge=False)
    for col in ("dtype", "tensors", "params", "bytes"):
        params.add_column(col, justify="right" if col != "dtype" else "left")
    for dtype, d in s["parameters_by_dtype"].items():
        params.add_row(dtype, str(d["tensors"]), _count(d["params"]), _human(d["bytes"]))
    console.print(params)
    if s["external_data_bytes"]:
        console.print(f"external data: {_human(s['external_data_bytes'])} (not read)")

    ops_table = Table(
        title=f"ops: {s['nodes']} nodes" + (f", {s['subgraphs']} subgraphs" if s["subgraphs"] else ""),
        title_justify="left", show_edge=False,
    )
    ops_table.add_column("op type")
    ops_table.add_column("count", justify="right")
    ops_table.add_column("quantizable", justify="right")
    cands = s["quantization_candidates"]
    for op, n in s["op_types"].items():
        c = cands.get(op)
        ops_table.add_row(escape(op), str(n), f"{c['nodes']}" if c else "")
    console.print(ops_table)
    n_cand = sum(c["nodes"] for c in cands.values())
    console.print(
        f"quantization candidates: {n_cand} nodes holding {_human(s['candidate_weight_bytes'])} of weights"
    )
    _print_quantization(s["quantization"])


def _print_hardware(h: dict) -> None:
    cpu = h["cpu"]
    table = Table(title=f"hardware: {escape(cpu['model'])} ({cpu['cores']} cores)", title_justify="left",
                  show_edge=False)
    table.add_column("feature")
    table.add_column("present")
    for name, present in cpu["features"].items():
        table.add_row(name, "[green]yes[/green]" if present else "[dim]no[/dim]")
    console.print(table)
    console.print(f"int8: {h['int8_advice']}")
    t = h["cpu_target"]
    console.print(f"--target cpu here means {t['target']}: {escape(t['why'])}")
    rt = h["runtime"]
    console.print(f"onnxruntime {rt['onnxruntime']}; providers: {', '.join(rt['providers'])}")
    k = h["qtool_kernels"]
    console.print(f"qtool kernels: {k['backend']} ({', '.join(k['isa_paths']) or 'no native paths'})")
