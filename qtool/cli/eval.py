"""`qtool eval`: accuracy, latency and size of a candidate against its reference, with CI gates."""

from __future__ import annotations

import enum
import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import app, console, emit_json, info, progress, settings, warn
from qtool.fileio import write_text_atomic


class Backend(str, enum.Enum):
    onnxruntime = "onnxruntime"
    native = "native"


def _split(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


_HELP = {
    "runtime": "Where both models run and are timed: ort (onnxruntime, the default) or openvino "
               "(needs pip install 'qtool[openvino]').",
    "runtimes": "Compare runtimes, e.g. ort,openvino: reference and candidate on each, agreement with the "
                "float reference on onnxruntime, latency, and the fastest deployment that meets the floor "
                "(the guard's 15 dB / 0.9 agreement, or --min-sqnr; --max-drop with labels). OpenVINO runs "
                "at its f32 hint and, where its default float is bf16 (AMX CPUs), at that default too.",
    "device": "openvino: CPU, GPU, NPU... [default: CPU]; ort: the execution provider (as --ep).",
    "precision": "openvino only: f32, bf16 or default (the device chooses: bf16 on AMX CPUs).",
    "timing": "process: each model timed in fresh processes, alternating rounds, medians (default with "
              "--runtimes: two compiled models in one process distort each other); inline: all sessions "
              "in this process, timed in turns (default otherwise: cheaper).",
    "rounds": "With --timing process [default: 3]: rounds (each model once per round, order reversed "
              "every other round); --runs is split over them.",
}


@app.command("eval")
def eval_command(
    candidate: Path = typer.Argument(..., help="The compressed model to evaluate."),
    reference: Path | None = typer.Option(
        None, "--reference", "-r", help="The float model it came from (for drops, SQNR, ratios)."
    ),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder (.npy/.npz/images/test_data_set_*)."),
    labels: Path | None = typer.Option(None, "--labels", help="Labels file (default: labels.* in --data)."),
    metric: list[str] | None = typer.Option(
        None, "--metric", "-m",
        help="top1, top5, accuracy, perplexity, cosine, sqnr, mse, or module:function; repeat or comma-separate.",
    ),
    ep: str | None = typer.Option(None, "--ep", help="onnxruntime execution providers, comma-separated "
                                  "(cpu,cuda,...) [default: cpu]."),
    runtime: str | None = typer.Option(None, "--runtime", help=_HELP["runtime"], rich_help_panel="Runtimes"),
    runtimes: str | None = typer.Option(None, "--runtimes", help=_HELP["runtimes"], rich_help_panel="Runtimes"),
    device: str | None = typer.Option(None, "--device", help=_HELP["device"], rich_help_panel="Runtimes"),
    precision: str | None = typer.Option(None, "--precision", help=_HELP["precision"], rich_help_panel="Runtimes"),
    timing: str | None = typer.Option(None, "--timing", help=_HELP["timing"], rich_help_panel="Runtimes"),
    rounds: int | None = typer.Option(None, "--rounds", help=_HELP["rounds"], rich_help_panel="Runtimes"),
    latency: bool = typer.Option(False, "--latency", help="Measure latency, throughput and memory."),
    runs: int | None = typer.Option(None, "--runs", help="Timed runs per model [default: 50]."),
    warmup: int | None = typer.Option(None, "--warmup", help="Untimed warm-up runs [default: 5]."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (0: onnxruntime default)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Samples per run."),
    limit: int = typer.Option(0, "--limit", help="Use only the first N samples (0: all)."),
    json_out: str | None = typer.Option(None, "--json", help="Print the JSON report on stdout (bare --json, as in every command), or write it to PATH."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Write a Markdown summary to PATH."),
    html: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML report (charts, no network) to PATH."),
    max_drop: str | None = typer.Option(
        None, "--max-drop", help="Gate: max metric drop, in metric units (0.01) or percent of the reference (1%)."
    ),
    min_sqnr: str | None = typer.Option(None, "--min-sqnr", help="Gate: min output SQNR in dB."),
    max_latency_ratio: str | None = typer.Option(
        None, "--max-latency-ratio", help="Gate: max candidate/reference median latency (1.0 or 110%)."
    ),
    diagnose: bool = typer.Option(False, "--diagnose", help="Per-layer SQNR, worst layers, --exclude advice."),
    top: int = typer.Option(5, "--top", help="With --diagnose: at most this many layers suggested."),
    backend: Backend = typer.Option(
        Backend.onnxruntime, "--backend",
        help="native: also run integer layers through qtool's kernels and compare.",
    ),
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe whose [eval] section sets defaults."),
    executor: str | None = typer.Option(None, "--executor", metavar="local|ray|ray://HOST:PORT", help="Shard the dataset pass over workers: local (one process per CPU), ray, or ray://HEAD:10001. Metrics merge exactly; latency is timed on one worker."),
) -> None:
    """Evaluate CANDIDATE (against --reference): metrics, output SQNR, latency, size; CI gates.

    Exit codes: 0 all gates passed, 1 error, 2 usage error, 3 a gate failed.
    --runtime openvino runs and times both models on OpenVINO instead of onnxruntime
    (--device, --precision); --runtimes ort,openvino compares the deployments and says which
    is fastest at the floor, including when float on one runtime beats the candidate on
    another. Diagnosis and --backend native always run on onnxruntime.
    Gates take numbers or percentages (--max-drop 1% of the reference metric). Without gates,
    an output whose SQNR is below 3 dB or cosine below 0.9 still prints a warning.

    \b
    Examples:
      qtool eval int8.onnx -r model.onnx -d eval/ --max-drop 0.01 --json report.json
      qtool eval int8.onnx -r model.onnx -d eval/ --latency --max-latency-ratio 1.0
      qtool eval int8.onnx -r model.onnx -d eval/ --diagnose
      qtool eval lm-int8.onnx -r lm.onnx -d tokens/ --metric perplexity   (input_ids in .npz)
      qtool eval int8.onnx -r model.onnx -d eval/ --latency --runtime openvino --precision f32
      qtool eval int8.onnx -r model.onnx -d eval/ --runtimes ort,openvino --markdown runtimes.md
    """
    from qtool.config import load_recipe
    from qtool.eval import evaluate, sharded
    from qtool.eval.gates import raise_on_failure

    r = load_recipe(recipe).override(
        "eval", runs=runs, warmup=warmup, threads=threads, max_drop=max_drop, min_sqnr=min_sqnr,
        max_latency_ratio=max_latency_ratio,
    )
    e = r.eval
    outputs = {"--markdown": markdown, "--html": html}
    if json_out is not None and json_out != "-":
        outputs["--json"] = Path(json_out)
    inputs = {"candidate model": candidate, "reference model": reference, "labels file": labels,
              "recipe": Path(recipe) if recipe and Path(recipe).is_file() else None}
    check_outputs(outputs, inputs, data)
    metrics = _split(metric) or list(e.metrics)
    providers, matrix = _runtime_flags(ep, runtime, runtimes, executor)
    report = (evaluate if executor is None else sharded.with_executor(executor))(
        candidate, data, reference=reference, labels=labels, metrics=metrics, providers=providers,
        batch_size=batch_size, limit=limit, latency=latency, runs=e.runs, warmup=e.warmup,
        threads=e.threads, diagnose=diagnose, diagnose_top=top, backend=backend.value,
        max_drop=e.max_drop, min_sqnr=e.min_sqnr, max_latency_ratio=e.max_latency_ratio,
        preprocess=r.preprocess, progress=progress, runtime=runtime or "ort", device=device,
        precision=precision, runtimes=matrix, timing=timing, rounds=rounds,
    )
    doc = report.to_dict()
    if not (settings.quiet and json_out == "-"):
        _print_report(doc)
    _write_reports(report, doc, json_out, markdown, html)
    for w in doc["warnings"]:
        warn(escape(w))
    from qtool.eval.gates import GateResult

    raise_on_failure([GateResult(**g) for g in doc["gates"]])


def _runtime_flags(ep: str | None, runtime: str | None, runtimes: str | None,
                   executor: str | None = None) -> tuple[list[str], list[str]]:
    """(onnxruntime providers, runtimes of the matrix); --ep with another runtime, and an
    executor with another runtime or the matrix, are errors."""
    from qtool.errors import UsageError
    from qtool.runtime.runtimes import parse_list

    providers = _split([ep]) if ep is not None else ["cpu"]
    if not providers:
        raise UsageError("--ep needs at least one provider", "e.g. --ep cpu")
    if ep is not None and runtime is not None and runtime.strip().lower() not in ("ort", "onnxruntime"):
        raise UsageError(f"--ep chooses onnxruntime's execution providers, not {runtime}'s device",
                         "use --device with --runtime openvino (e.g. --device CPU)")
    matrix = parse_list(runtimes) if runtimes is not None else []
    if executor is not None and (matrix or (runtime or "ort").strip().lower() not in ("ort", "onnxruntime")):
        raise UsageError("--executor shards the dataset pass over onnxruntime CPU workers; --runtime "
                         "openvino and --runtimes run in one process", "drop --executor, or those flags")
    return providers, matrix


def _write_reports(report, doc: dict, json_out: str | None, markdown: Path | None, html: Path | None) -> None:  # noqa: ANN001
    """--json PATH, --markdown, --html, each written atomically (bare --json prints)."""
    from qtool.eval.report import to_markdown

    if json_out == "-":
        emit_json(doc)
    elif json_out is not None:
        write_text_atomic(Path(json_out), report.to_json() + "\n")
        info(f"report written to {escape(json_out)}")
    if markdown is not None:
        write_text_atomic(markdown, to_markdown(doc))
        info(f"markdown summary written to {escape(str(markdown))}")
    if html is not None:
        from qtool.eval.html import render_eval, write_html

        write_html(render_eval(doc), html)
        info(f"HTML report written to {escape(str(html))}")


def check_outputs(outputs: dict[str, Path | None], inputs: dict[str, Path | None], data: Path) -> None:
    """Before any work: no report may land on an input (a model, its external data, the
    labels, the recipe, a file of the dataset folder) or on another report, and each
    report's folder must exist and take a new file."""
    from qtool.errors import UsageError
    from qtool.model import check_output_path, same_file

    chosen = {flag: path for flag, path in outputs.items() if path is not None}
    for flag, path in chosen.items():
        hint = f"qtool never overwrites its inputs; give {flag} another path"
        for role, source in inputs.items():
            if source is not None and same_file(path, source):
                raise UsageError(f"{flag} {path} is the {role}", hint)
        if path.exists() and Path(data).is_dir() and Path(data).resolve() in path.resolve().parents:
            raise UsageError(f"{flag} {path} is a file of the dataset folder {data}", hint)
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder", "give a file name")
        _probe_writable(path, flag)
        for role in ("candidate model", "reference model"):
            if inputs.get(role) is not None and Path(inputs[role]).is_file():
                try:  # what is left to refuse: the model's external data files
                    check_output_path(path, inputs[role])
                except UsageError as exc:
                    raise UsageError(f"{flag}: {exc.message}", hint) from None
    paths = list(chosen.items())
    for i, (flag, path) in enumerate(paths):
        for other, other_path in paths[i + 1:]:
            if same_file(path, other_path):
                raise UsageError(f"{flag} and {other} name the same file {path}", "give each report its own path")


def _probe_writable(path: Path, flag: str) -> None:
    """Create and remove a file where the report will go: permission bits alone do not
    tell (root, read-only mounts, ACLs), and the report is written there the same way."""
    import tempfile

    from qtool.errors import UsageError

    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag}: folder {parent} does not exist", f"create it first: mkdir -p {parent}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qtool-probe-", dir=parent)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write to folder {parent} ({exc.strerror})",
                         "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


def _n(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _print_report(doc: dict) -> None:
    cand = doc["candidate"]
    ref = doc["reference"]
    title = f"[bold]{escape(cand['path'])}[/bold]" + (f" vs {escape(ref['path'])}" if ref else "")
    console.print(f"{title}  ({doc['data']['samples']} samples)")
    if doc["metrics"]:
        t = Table(title="metrics", title_justify="left", show_edge=False)
        for col in ("metric", "candidate", "reference", "drop"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for m in doc["metrics"]:
            t.add_row(escape(m["name"]), _n(m["candidate"]), _n(m["reference"]), _n(m["drop"]))
        console.print(t)
    if doc["outputs"]:
        t = Table(title="outputs vs reference", title_justify="left", show_edge=False)
        for col in ("output", "SQNR dB", "cosine", "max abs", "MSE", "argmax agree"):
            t.add_column(col, justify="left" if col == "output" else "right")
        for o in doc["outputs"]:
            sq = "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:.2f}"
            t.add_row(escape(o["name"]), sq, _n(o["cosine"], 6), _n(o["max_abs"]), _n(o["mse"]),
                      _n(o["argmax_agreement"]))
        console.print(t)
    if doc["consistency"]:
        t = Table(title="consistency", title_justify="left", show_edge=False)
        for col in ("a", "b", "tensor", "SQNR dB", "max abs", "exact"):
            t.add_column(col)
        for c in doc["consistency"]:
            t.add_row(escape(c["a"]), escape(c["b"]), escape(c["output"]),
                      "exact" if c["sqnr_db"] is None else f"{c['sqnr_db']:.2f}", _n(c["max_abs"]),
                      _n(c.get("exact_match_rate")))
        console.print(t)
    if doc["latency"]:
        t = Table(title="latency (ms)", title_justify="left", show_edge=False)
        for col in ("model", "ep", "median", "p90", "p99", "IQR", "median CI", "/s", "MiB"):
            t.add_column(col, justify="left" if col in ("model", "ep") else "right", no_wrap=True)
        for s in doc["latency"]:
            lo, hi = s["median_ci_ms"]
            t.add_row("cand" if s["model"] == "candidate" else "ref", s["provider"],
                      f"{s['median_ms']:.3g}", f"{s['p90_ms']:.3g}", f"{s['p99_ms']:.3g}",
                      f"{s['iqr_ms']:.2g}", f"{lo:.3g}-{hi:.3g}", f"{s['throughput']:.0f}",
                      _n(s["memory_mib"], 2))
        console.print(t)
        for p, ratio in doc["latency_ratio"].items():
            console.print(f"latency ratio candidate/reference on {p}: [bold]{ratio:.3f}[/bold]")
    _print_runtimes(doc.get("runtimes"))
    from qtool.eval.report import size_change

    size = doc["size"]
    line = f"size: {size['candidate_bytes'] / 2**20:.2f} MiB"
    if size.get("reference_bytes"):
        line += f" (reference {size['reference_bytes'] / 2**20:.2f} MiB, {size_change(size['compression_ratio'])})"
    console.print(line)
    hw = doc["hardware"]
    if hw:
        for p in hw["providers"]:
            ints = ", ".join(f"{k} x{v}" for k, v in p["integer_nodes"].items()) or "none"
            console.print(f"{p['provider']}: integer kernels: {escape(ints)}")
            unfused = [n for n in p["float_after_dequantize"] if n["dequantized"] == "activations"]
            weight_only = len(p["float_after_dequantize"]) - len(unfused)
            if unfused:
                console.print(f"  float after DequantizeLinear (unfused): "
                              f"{escape(', '.join(n['node'] or n['op_type'] for n in unfused[:8]))}")
            if weight_only:
                console.print(f"  {weight_only} node(s) run in float on dequantized weights")
    diag = doc["diagnosis"]
    if diag:
        t = Table(title=f"diagnosis: {diag['matched_tensors']} matched tensors, worst layers first",
                  title_justify="left", show_edge=False)
        for col in ("layer", "op", "local SQNR dB", "SQNR dB", "tensor"):
            t.add_column(col, justify="right" if "SQNR" in col else "left")
        for layer in [x for x in diag["layers"] if x["quantized"]][: max(diag["top"], 10)]:
            t.add_row(escape(layer["node"]), layer["op_type"], _n(layer["local_sqnr_db"]),
                      _n(layer["sqnr_db"]), escape(layer["tensor"]))
        console.print(t)
        checks = diag.get("checks") or []
        if checks:
            console.print(f"checked by re-converting (baseline {diag['baseline_sqnr_db']:.2f} dB output SQNR):")
            for c in checks:
                console.print(f"  without {escape(', '.join(c['exclude']))}: {c['sqnr_db']:.2f} dB "
                              f"({c['gain_db']:+.2f} dB)")
        console.print(escape(diag.get("advice", "")))
        if diag["exclude_flags"]:
            console.print("  " + escape(" ".join(diag["exclude_flags"])))
        if diag["recipe_snippet"]:
            console.print(diag["recipe_snippet"], markup=False, highlight=False)
    for g in doc["gates"]:
        from qtool.eval.gates import GateResult

        text = GateResult(**g).describe()
        console.print(("[green]" if g["passed"] else "[red]") + escape(text) + ("[/green]" if g["passed"] else "[/red]"))


def _print_runtimes(section: dict | None) -> None:
    """--runtimes: each deployment's agreement and latency, then the recommendation."""
    if not section:
        return
    t = Table(title=f"runtimes (agreement with {section['truth']}; timing: {section['timing']['mode']})",
              title_justify="left", show_edge=False)
    for col in ("model", "runtime", "runs in", "median ms", "worst SQNR dB", "agree", "floor"):
        t.add_column(col, justify="left" if col in ("model", "runtime", "runs in", "floor") else "right")
    for d in section["deployments"]:
        worst = min((o["segment_sqnr_db"] for o in d["outputs"]), key=_db, default=None)
        agree = [o["agreement"] for o in d["outputs"] if o["agreement"] is not None]
        t.add_row("cand" if d["model"] == "candidate" else "ref", escape(d["label"]), d["precision"] or "model types",
                  _n(d["median_ms"]), _n(worst), _n(min(agree)) if agree else "–",
                  "[green]meets[/green]" if d["meets_floor"] else "[red]misses[/red]")
    console.print(t)
    for i, line in enumerate(section["recommendation"]):
        console.print(("[bold]" + escape(line) + "[/bold]") if i == 0 else "  " + escape(line))


def _db(value) -> float:  # noqa: ANN001 - a number or "inf"/"-inf"
    return float(value) if value is not None else float("nan")

