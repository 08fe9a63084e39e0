"""``qtool tune``: the smallest mixed-precision model within an accuracy budget.

Phases (each reports progress through ``progress(description, total, unit)``, a context
manager yielding ``advance(n)``, as qtool.cli.app.progress):

1. split: the search split is every other sample of ``data`` (positions 0, 2, 4, ...), the
   held-out split the rest (1, 3, 5, ...), or all of ``data`` / all of ``eval_data`` when
   held-out data is given. Calibration (static int8) and sensitivities use only the search
   split; only the final check reads the held-out split.
2. sensitivity (qtool.tune.sensitivity): each layer group alone at each candidate precision,
   scored on the search split, cached on disk. In the int8 schemes a layer at 8 bits is
   int8 and one below 8 bits is weight-only blocks (MatMulNBits for MatMul/Gemm, blocked
   DequantizeLinear feeding a float Conv for Conv: opset 21, so a CNN below it takes 2/3/4-bit
   Convs only with ``allow_opset_upgrade``, which raises the opset once with onnx's converter).
3. search (qtool.tune.search): greedy chain of moves; prefixes of it are measured on the
   search split and the longest within the budget (``max_drop``) or the shortest within the
   size (``target_mb``) is kept.
4. verify: the chosen model is written to ``output`` and scored on the held-out split; when
   its drop exceeds the budget, the most sensitive lowered group goes one precision up and
   the check repeats (the fallback), down to all-float if need be.
5. frontier: uniform candidates (every group at each of ``bits``) scored on held-out data
   when time allows, so the table compares tuned against uniform int8 / int4.

The output recipe reproduces the model: ``qtool convert MODEL --recipe OUT.recipe.toml``
(static int8 also ``--calib OUT.calib.json``, the table tune calibrated on the search split).
Every group gets a ``[[layer]]`` override and a final ``*`` = 32 keeps all other nodes
float, so the tuned model quantizes exactly the layers the search chose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qtool.config import LayerOverride, Recipe, load_recipe
from qtool.errors import UsageError
from qtool.tune.frontier import Candidate, mark_frontier
from qtool.tune.search import (
    assignment_after,
    estimated_bytes,
    order_moves,
    raise_most_sensitive,
)
from qtool.tune.sensitivity import (
    Group,
    Scorer,
    SensitivityCache,
    data_key,
    find_groups,
    glob_escape,
    role_key,
)

__all__ = ["TuneResult", "parse_bits", "parse_budget", "recipe_toml", "tune", "tuned_recipe"]

ProgressFactory = Callable[[str, float | None, str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _no_progress(description: str, total: float | None, unit: str = "") -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None


def parse_bits(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"8,4"`` -> (8, 4): the candidate precisions below float (32 is always allowed)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = sorted({int(str(v).strip()) for v in items if str(v).strip()}, reverse=True)
    except ValueError:
        raise UsageError(f"--bits {text!r} is not a list of integers", "e.g. --bits 8,4") from None
    if 16 in values:
        raise UsageError(
            "--bits 16 (fp16 per layer) is not supported by convert's mixed precision yet",
            "use --bits 8,4 (or 8,4,2); float layers stay at 32 bits",
        )
    values = [v for v in values if v != 32]
    bad = [v for v in values if v not in (8, 4, 3, 2)]
    if bad or not values:
        raise UsageError(f"--bits {text!r}: each precision must be 8, 4, 3 or 2", "e.g. --bits 8,4")
    return tuple(values)


def parse_budget(text: str | float | None) -> tuple[float, bool]:
    """``"0.01"`` -> (0.01, False) in metric units; ``"2%"`` -> (2.0, True): percent of the
    float model's metric on the split."""
    if text is None:
        return 1.0, True
    s = str(text).strip()
    relative = s.endswith("%")
    try:
        value = float(s[:-1] if relative else s)
    except ValueError:
        raise UsageError(f"--max-drop {text!r} is not a number", "e.g. --max-drop 0.01 or --max-drop 2%") from None
    if value < 0 or not math.isfinite(value):
        raise UsageError(f"--max-drop must be >= 0, got {text}", "e.g. --max-drop 0.01")
    return value, relative


def sidecar(output: Path, suffix: str) -> Path:
    """``out/m.onnx`` -> ``out/m.recipe.toml`` etc."""
    return output.with_name(output.stem + suffix)


# -- recipes ------------------------------------------------------------------------------


def _patterns(group: Group, all_names: Sequence[str]) -> list[str]:
    """The [[layer]] patterns for a group: one glob when it matches exactly the members."""
    import fnmatch

    if len(group.members) > 1:
        glob = role_key(glob_escape(group.members[0])).replace("#", "*")
        hits = {n for n in all_names if fnmatch.fnmatchcase(n, glob)}
        if hits == set(group.members):
            return [glob]
    return [glob_escape(m) for m in group.members]


def tuned_recipe(base: Recipe, groups: Sequence[Group], bits: Sequence[int], all_names: Sequence[str],
                 name: str = "tuned", description: str = "") -> Recipe:
    """``base`` with one [[layer]] per group at its bits, and ``*`` = 32 last."""
    rules = []
    for group, b in zip(groups, bits):
        rules += [LayerOverride(p, int(b)) for p in _patterns(group, all_names)]
    rules.append(LayerOverride("*", 32))
    return dataclasses.replace(base, name=name, description=description, layer=tuple(rules))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def recipe_toml(recipe: Recipe, header: str = "") -> str:
    """``recipe`` as TOML that qtool.config.load_recipe reads back to an equal Recipe."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"name = {_toml_value(recipe.name)}", f"description = {_toml_value(recipe.description)}", ""]
    for section in ("quantize", "weight_only", "calibration", "fp16", "preprocess", "eval"):
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(recipe, section)):
            value = getattr(getattr(recipe, section), f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    for rule in recipe.layer:
        lines += ["[[layer]]", f"match = {_toml_value(rule.match)}", f"bits = {rule.bits}", ""]
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------


@dataclass
class TuneResult:
    output: Path
    recipe_path: Path
    frontier_path: Path
    table_path: Path | None
    plot_path: Path | None
    recipe: Recipe
    scheme: str
    metric: str
    higher_is_better: bool
    budget: float  # metric units (max-drop mode) or bytes (target-size mode)
    mode: str  # "max-drop" | "target-size"
    groups: list[Group]
    bits: list[int]
    reference_metric: float  # float model, held-out split
    tuned_metric: float
    drop: float
    size_bytes: int
    float_bytes: int
    within_budget: bool
    fallback_steps: int
    measured: int
    cached: int
    out_of_time: bool
    seconds: float
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        mix = Counter(self.bits)
        return {
            "output": str(self.output), "recipe": str(self.recipe_path), "frontier": str(self.frontier_path),
            "calibration_table": str(self.table_path) if self.table_path else None,
            "plot": str(self.plot_path) if self.plot_path else None,
            "scheme": self.scheme, "metric": self.metric, "higher_is_better": self.higher_is_better,
            "mode": self.mode, "budget": self.budget,
            "reference_metric": self.reference_metric, "tuned_metric": self.tuned_metric, "drop": self.drop,
            "size_bytes": self.size_bytes, "float_bytes": self.float_bytes,
            "within_budget": self.within_budget, "fallback_steps": self.fallback_steps,
            "groups": [{"key": g.key, "members": len(g.members), "op_type": g.op_types[0], "params": g.params,
                        "bits": b} for g, b in zip(self.groups, self.bits)],
            "groups_per_bits": {str(k): v for k, v in sorted(mix.items(), reverse=True)},
            "measured": self.measured, "cached": self.cached, "out_of_time": self.out_of_time,
            "seconds": round(self.seconds, 2),
            "candidates": [c.to_dict() for c in self.candidates], "notes": list(self.notes),
        }


def _mix(bits: Sequence[int]) -> str:
    return " ".join(f"{b}:{n}" for b, n in sorted(Counter(bits).items(), reverse=True))


def default_base(model) -> Recipe:
    """int8-static for models with Conv weights (CNNs), else 4-bit weight-only (transformers)."""
    from qtool.model import iter_nodes

    has_conv = any(n.op_type == "Conv" and len(n.inputs) > 1 and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None for n in iter_nodes(model))
    return load_recipe("int8-static" if has_conv else "int4-weight-only")


def tune(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    metric: str | None = None,
    max_drop: str | float | None = None,
    target_mb: float | None = None,
    bits: str | Sequence[int] = (8, 4),
    budget_minutes: float | None = None,
    recipe: str | Recipe | None = None,
    group: str = "auto",
    limit: int = 0,
    cache_dir: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    uniform: bool = True,
    threads: int = 0,
    allow_opset_upgrade: bool = False,
    progress: ProgressFactory | None = None,
) -> TuneResult:
    """Tune ``model_path`` (see the module doc); writes ``output`` and its sidecar files.

    ``max_drop``: the largest metric loss allowed (metric units, or ``"2%"`` of the float
    metric); ``target_mb``: the largest size in MB (then accuracy is maximised within it).
    ``limit``: at most this many samples per split (0: all). ``budget_minutes``: stop
    measuring sensitivities in time to verify; the run ends within about one measurement
    of the budget.
    """
    from qtool.data import Dataset, input_specs
    from qtool.eval.evaluate import default_metrics
    from qtool.model import (
        check_output_path,
        iter_nodes,
        load,
        model_size_bytes,
        opset_version,
        save,
    )
    from qtool.pipeline import calibrate, convert_model, plan_for, upgrade_opset

    start = time.monotonic()
    deadline = start + budget_minutes * 60 if budget_minutes else math.inf
    if budget_minutes is not None and budget_minutes <= 0:
        raise UsageError(f"--budget-minutes must be > 0, got {budget_minutes}", "e.g. --budget-minutes 10")
    progress = progress or _no_progress
    model_path, output = Path(model_path), Path(output)
    check_output_path(output, model_path)
    if max_drop is not None and target_mb is not None:
        raise UsageError("--max-drop and --target-size are alternatives", "pass one budget: accuracy or size")
    if target_mb is not None and target_mb <= 0:
        raise UsageError(f"--target-size must be > 0 MB, got {target_mb}", "e.g. --target-size 5")
    if plot_path is not None and Path(plot_path).suffix.lower() not in (".svg", ".png"):
        raise UsageError(f"--plot {plot_path}: unknown image type {Path(plot_path).suffix or '(none)'}",
                         "use a .svg or .png path")
    mode = "target-size" if target_mb is not None else "max-drop"
    drop_value, relative = parse_budget(max_drop)
    candidate_bits = parse_bits(bits)
    notes: list[str] = []

    model = load(model_path)
    if isinstance(recipe, Recipe):
        base = recipe
    else:
        base = load_recipe(recipe) if recipe is not None else default_base(model)
    if base.layer:
        notes.append(f"the recipe's {len(base.layer)} [[layer]] overrides were replaced by the tuned ones")
    if allow_opset_upgrade:
        base = base.override("quantize", allow_opset_upgrade=True)
    scheme = plan_for(base).kind
    if scheme == "fp16":
        raise UsageError("tune needs an integer recipe, not fp16", "use --recipe int8-static, int8-dynamic or int4-weight-only")
    if scheme == "weight-only":
        default_bits = min(candidate_bits)
        base = base.override("quantize", bits=default_bits, format="matmulnbits"
                             if base.weight_only.format == "matmulnbits" else base.quantize.format)
    else:
        base = base.override("quantize", bits=8)
        if limit:
            base = base.override("calibration", samples=limit * (1 if eval_data else 2))
    block_size = base.weight_only.block_size

    specs = input_specs(model)
    search_ds = Dataset(data, specs, base.preprocess)
    if eval_data is not None:
        held_ds, search_shard, held_shard = Dataset(eval_data, specs, base.preprocess), (0, 1), (0, 1)
    else:
        held_ds, search_shard, held_shard = search_ds, (0, 2), (1, 2)
        if len(search_ds) < 2:
            raise UsageError(f"{data} holds {len(search_ds)} sample: tune needs 2 or more to hold some out",
                             "add samples, or pass --eval-data DIR for the held-out check")
    if metric is None:
        first = model.graph.outputs[0]
        shape = tuple(first.shape) if first.shape is not None else ()
        found = default_metrics(shape, search_ds.labels() is not None, [s.name for s in specs])
        metric = found[0] if found else "cosine"

    opset = opset_version(model) or 0
    may_upgrade = base.quantize.allow_opset_upgrade
    groups = find_groups(model, scheme, candidate_bits, block_size, group, base.quantize.op_types,
                         opset=25 if may_upgrade else opset)
    if not groups:
        raise UsageError(
            f"no layer of {model_path.name} can take {','.join(map(str, candidate_bits))} bits in the {scheme} scheme",
            "check `qtool inspect MODEL`; Conv layers below 8 bits need opset 21 (--allow-opset-upgrade) "
            "and 16+ input channels per group, weight-only needs MatMul/Gemm weights",
        )
    if not may_upgrade and opset < 21:
        lifted = find_groups(model, scheme, candidate_bits, block_size, group, base.quantize.op_types, opset=25)
        more = sum(len(a.choices) for a in lifted if "Conv" in a.op_types) - sum(
            len(a.choices) for a in groups if "Conv" in a.op_types)
        if more:
            notes.append(f"Conv weights below 8 bits need opset 21 (the model has {opset}): "
                         "pass --allow-opset-upgrade to let them take them")
    conv_low = [b for grp in groups if "Conv" in grp.op_types for b in grp.choices
                if b < 8 or scheme == "weight-only" and b < 32]
    if conv_low and may_upgrade:
        # Once here, so each candidate's convert does not run the converter again.
        model = upgrade_opset(model, 25 if 2 in conv_low else 21, [])
    all_names = [n.name for n in iter_nodes(model) if n.name]
    float_bytes = model_size_bytes(model_path)
    other_bytes = max(float_bytes - sum(4.0 * g.params for g in groups), 0.0)

    with progress("float reference (search split)", None, "samples") as advance:
        search = Scorer(model_path, search_ds, search_shard, limit, metric, threads)
        advance(search.samples)
    ref = search.reference.metric
    budget = (drop_value * abs(ref) / 100.0 if relative else drop_value) if mode == "max-drop" else target_mb * 1e6

    table = None
    table_path = None
    if scheme == "int8-static":
        with progress("calibrate (search split)", None, "samples") as advance:
            table = calibrate(model_path, data, base, shard=search_shard, threads=threads)
            advance(table.samples if hasattr(table, "samples") else 0)

    context = {"scheme": scheme, "recipe": base.to_dict(), "metric": metric, "split": search_shard,
               "data": data_key(search_ds, search_shard, limit)}
    cache = SensitivityCache.open(cache_dir, model, model_path, context)
    measured = cached = 0

    def recipe_for(assign: Sequence[int]) -> Recipe:
        return tuned_recipe(base, groups, assign, all_names)

    def build(assign: Sequence[int]):
        converted, _, _ = convert_model(model, recipe_for(assign), table=table)
        return converted

    def measure(assign: Sequence[int], label: str, on_sample=None):
        """Score an assignment on the search split (cached)."""
        nonlocal measured, cached
        import onnx_ir as ir

        key = cache.key({m: b for g, b in zip(groups, assign) for m in g.members})
        hit = cache.get(key)
        if hit is not None:
            cached += 1
            return hit
        payload = ir.to_proto(build(assign)).SerializeToString()
        score = search.score(payload, on_sample=on_sample)
        cache.put(key, score, label)
        measured += 1
        return score

    # -- 2. sensitivity -----------------------------------------------------------------
    tasks = [(g, b) for g, grp in enumerate(groups) for b in grp.choices[1:]]
    drops: dict[tuple[int, int], float] = {}
    sqnrs: dict[tuple[int, int], float] = {}
    per_measure = None
    out_of_time = False
    float_bits = [grp.choices[0] for grp in groups]
    with progress("sensitivity", len(tasks), "layers") as advance:
        for g, b in tasks:
            # Keep room for the search and the held-out check (about 8 measurements' worth).
            if per_measure is not None and time.monotonic() + per_measure * 9 > deadline:
                out_of_time = True
                break
            t = time.monotonic()
            assign = list(float_bits)
            assign[g] = b
            score = measure(assign, f"{groups[g].key}@{b}")
            drops[(g, b)] = search.drop(score)
            sqnrs[(g, b)] = score.sqnr_db
            spent = time.monotonic() - t
            if spent > 0.05:  # a cache hit says nothing about the cost of a measurement
                per_measure = spent if per_measure is None else max(per_measure, spent)
            advance(1)
    if out_of_time:
        notes.append(f"time budget: {len(drops)} of {len(tasks)} sensitivities measured; "
                     "a precision not measured is not used (those groups stay at their last measured one, or float)")

    # -- 3. search ----------------------------------------------------------------------
    chain = order_moves(groups, drops, sqnrs, budget if mode == "max-drop" else 1.0, scheme, block_size)
    candidates: list[Candidate] = []

    def record(assign: Sequence[int], score, split: str, label: str, size: float) -> None:
        d = (search if split == "search" else held).drop(score)
        candidates.append(Candidate(label, split, float(size), score.metric, d, score.sqnr_db, _mix(assign)))

    def est(assign: Sequence[int]) -> float:
        return estimated_bytes(groups, assign, other_bytes, scheme, block_size)

    def fits(k: int) -> bool:
        assign = assignment_after(groups, chain, k)
        score = measure(assign, f"chain[{k}]")
        record(assign, score, "search", f"chain {k}/{len(chain)}", est(assign))
        return search.drop(score) <= budget

    with progress("search", None, "candidates") as advance:
        if mode == "max-drop":
            lo, hi = 0, len(chain)
            if chain and fits(hi):
                lo = hi
            advance(1)
            while hi - lo > 1:
                if per_measure is not None and time.monotonic() + per_measure * 5 > deadline:
                    out_of_time = True
                    notes.append("time budget: the chain search stopped early (kept the last prefix within budget)")
                    break
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
                advance(1)
            k = lo
        else:
            k = next((i for i in range(len(chain) + 1) if est(assignment_after(groups, chain, i)) <= budget),
                     len(chain))
            if est(assignment_after(groups, chain, k)) > budget:
                notes.append(f"even every group at its lowest precision is estimated above {target_mb} MB")
            fits(k)
            advance(1)
    chosen = assignment_after(groups, chain, k)

    # -- 4. verify on held-out data, with fallback --------------------------------------
    with progress("float reference (held-out)", None, "samples") as advance:
        held = Scorer(model_path, held_ds, held_shard, limit, metric, threads)
        advance(held.samples)
    held_ref = held.reference.metric
    search_budget = budget
    if mode == "max-drop" and relative:
        # A percentage is of the float metric on the split being checked.
        budget = drop_value * abs(held_ref) / 100.0
        notes.append(f"budget {drop_value}% of the float {metric}: {search_budget:.4g} on the search split "
                     f"(float {ref:.4f}), {budget:.4g} on held-out data (float {held_ref:.4f})")
    fallback = 0
    tmp = Path(tempfile.mkdtemp(prefix=".qtool-tune-", dir=output.parent))
    try:
        while True:
            converted = build(chosen)
            save(converted, output, input_path=model_path)
            size = model_size_bytes(output)
            with progress("verify (held-out)", held.samples, "samples") as advance:
                score = held.score(output, on_sample=advance)
            drop = held.drop(score)
            label = "tuned" if fallback == 0 else f"tuned, fallback {fallback}"
            record(chosen, score, "held-out", label, size)
            if mode == "max-drop" and drop > budget:
                raised = raise_most_sensitive(groups, chosen, drops, sqnrs)
                if raised is None:
                    break
                if time.monotonic() > deadline:
                    notes.append("time budget: stopped during the fallback with the drop above budget")
                    out_of_time = True
                    break
                chosen, fallback = raised, fallback + 1
                continue
            if mode == "target-size" and size > budget and k < len(chain):
                k += 1
                chosen = assignment_after(groups, chain, k)
                fallback += 1
                continue
            break
        final_metric, final_drop, final_size = score.metric, drop, size
        within = final_drop <= budget if mode == "max-drop" else final_size <= budget

        # -- 5. uniform candidates for the table ------------------------------------------
        if uniform:
            with progress("uniform candidates (held-out)", len(candidate_bits) + 1, "models") as advance:
                candidates.append(Candidate("float", "held-out", float(float_bytes), held_ref, 0.0,
                                            float("inf"), _mix(float_bits)))
                advance(1)
                for b in candidate_bits:
                    if per_measure is not None and time.monotonic() + per_measure * 2 > deadline:
                        notes.append(f"time budget: uniform {b}-bit not evaluated")
                        break
                    assign = [min(c for c in grp.choices if c >= b) for grp in groups]
                    path = tmp / f"uniform{b}.onnx"
                    save(build(assign), path, verify=False)
                    s = held.score(path)
                    where = "" if all(a == b for a in assign) else " (where allowed)"
                    record(assign, s, "held-out", f"uniform {b}{where}", model_size_bytes(path))
                    path.unlink()
                    advance(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mark_frontier(candidates)
    final_recipe = recipe_for(chosen)
    final_recipe = dataclasses.replace(
        final_recipe, name=output.stem,
        description=f"qtool tune: {metric} {final_metric:.4f} (float {held_ref:.4f}) on held-out data, "
                    f"{final_size / 1e6:.2f} MB ({float_bytes / 1e6:.2f} MB float); {_mix(chosen)}",
    )
    recipe_path = sidecar(output, ".recipe.toml")
    header = (f"Written by qtool tune for {model_path.name}. Reproduce with:\n"
              f"  qtool convert {model_path.name} --recipe {recipe_path.name} -o {output.name}"
              + (f" --calib {sidecar(output, '.calib.json').name}" if table is not None else ""))
    recipe_path.write_text(recipe_toml(final_recipe, header))
    if table is not None:
        table_path = table.save(sidecar(output, ".calib.json"))
    from qtool.tune.frontier import plot, table_markdown

    frontier_path = sidecar(output, ".frontier.md")
    frontier_path.write_text(
        f"# qtool tune: {model_path.name}\n\nmetric: {metric} ({'higher' if search.higher_is_better else 'lower'} "
        f"is better); drop = loss vs the float model on the same split; search-split sizes are estimates, "
        f"held-out sizes are files.\n\n" + table_markdown(candidates, metric)
    )
    plotted = plot(candidates, plot_path, metric) if plot_path is not None else None
    return TuneResult(
        output=output, recipe_path=recipe_path, frontier_path=frontier_path, table_path=table_path,
        plot_path=plotted, recipe=final_recipe, scheme=scheme, metric=metric,
        higher_is_better=search.higher_is_better, budget=budget, mode=mode, groups=list(groups),
        bits=list(chosen), reference_metric=held_ref, tuned_metric=final_metric, drop=final_drop,
        size_bytes=int(final_size), float_bytes=int(float_bytes), within_budget=within,
        fallback_steps=fallback, measured=measured, cached=cached, out_of_time=out_of_time,
        seconds=time.monotonic() - start, candidates=candidates, notes=notes,
    )

