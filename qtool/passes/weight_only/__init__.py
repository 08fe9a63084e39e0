"""Weight-only block quantization pass: MatMul/Gemm/Gather/Conv weights -> 2/3/4/8-bit blocks.

Rewrites (pattern -> replacement), each counted in the PassReport:

- ``MatMul(A, W[K, N] const)`` [``+ Add(bias[N] const)``] -> ``com.microsoft.MatMulNBits(A,
  B, scales, [zero_points], , [bias])`` (format ``matmulnbits``), or ``MatMul(A,
  DequantizeLinear(x[K, N], scale[K/bs, N], [zp], axis=0, block_size))`` (format ``qdq``,
  opset 21 for int4/uint4, opset 25 for int2/uint2; any ONNX runtime reads it).
- ``Gemm(A, B const, [C])`` (transA = 0; transB, alpha and beta folded into the weight and
  bias) -> the same as MatMul.
- ``Gather(E[V, D] const, ids)`` (axis 0) -> ``com.microsoft.GatherBlockQuantized`` (uint8
  packed, blocks along D) or ``Gather(DequantizeLinear(E_q, axis=1), ids)`` for ``qdq``.
- ``Conv(X, W[M, C/g, k...] const, [B])`` -> ``Conv(X, DequantizeLinear(W_q, scale[M,
  ceil((C/g)/bs), k...], [zp], axis=1, block_size), [B])`` in either format (onnxruntime has
  no low-bit Conv kernel: the weight is dequantized and the Conv runs in float). A block is
  ``bs`` input channels at one (output channel, kernel position); when bs does not divide
  C/g the last block is shorter, as the ONNX spec allows (scale dimension ceil(C/g / bs)).
  Refused with a reason: C/g < 16 (depthwise and RGB-input convs: a block of fewer than 16
  weights costs more in scales than 4 bits save), and a model below opset 21 (25 for 2-bit)
  without ``allow_opset_upgrade``.

Streaming: weights are read one tensor at a time (external data stays memory-mapped until
then), quantized in row chunks, and each fp32 tensor is released as soon as its quantized
replacement is in the graph, so peak memory is about the largest weight plus the
quantized model (1/8 of fp32 at 4 bits). Progress is reported in bytes of fp32 weights.

Defaults follow measurements on x86 with onnxruntime 1.32 (bench/results/convert_lowbit.md):
MatMulNBits at accuracy_level 4 (int8 activations) is the fast path; level 0 (fp32
activations) was 2.5-3.8x slower for 1 and 32 tokens, so choosing 0 or 1 adds a note.

The package, one module per phase: ``items`` (which weights, at which bits, or why not),
``quantize`` (one weight into blocks), ``rewrite`` (the replacement nodes), ``stats``
(gptq/awq activation statistics); this module checks the recipe and runs the phases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.errors import UsageError
from qtool.model import require_opset
from qtool.passes import PassReport
from qtool.passes.graph import Names, drop_unused_initializers
from qtool.passes.weight_only.items import (
    Item,
    conv_opset_needed,
    dq_opset,
    find_items,
    item_name,
    weight_only_inputs,
)
from qtool.passes.weight_only.quantize import (
    CONV_ALGORITHMS,
    data_aware_args,
    quantize_conv,
    quantize_item,
)
from qtool.passes.weight_only.rewrite import MS_DOMAIN, rewrite
from qtool.passes.weight_only.stats import collect_weight_only_stats, one_blas_thread
from qtool.quant import formats
from qtool.quant.blockwise import (
    ALGORITHMS,
    DATA_AWARE,
    ActivationStats,
    QuantOutcome,
    quantize_weight,
)

__all__ = ["apply_weight_only", "collect_weight_only_stats", "conv_opset_needed", "weight_only_inputs"]

_SLOW_LEVEL_NOTE = (
    "accuracy_level {level}: MatMulNBits then multiplies with float activations, measured "
    "2.5-3.8x slower than level 4 on this x86 CPU (onnxruntime 1.32, 1 and 32 tokens, "
    "bench/results/convert_lowbit.md); --accuracy-level 4 is the fast default"
)
_KEYS = {"matmul": "MatMul", "gemm": "Gemm", "gather": "Gather", "conv": "Conv"}
_TARGETS = {
    ("matmul", "matmulnbits"): "MatMulNBits",
    ("gemm", "matmulnbits"): "MatMulNBits",
    ("gather", "matmulnbits"): "GatherBlockQuantized",
}


def _check(recipe: Recipe, bits: int, fmt: str, algorithm: str) -> None:
    wo = recipe.weight_only
    formats.check_bits(bits, wo.block_size)
    if fmt not in ("matmulnbits", "qdq"):
        raise UsageError(f"unknown weight-only format {fmt!r}", "use --format matmulnbits or --format qdq")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}", f"use one of: {', '.join(ALGORITHMS)}")
    if wo.accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(
            f"accuracy level {wo.accuracy_level} is not one of 0, 1, 2, 3, 4",
            "use --accuracy-level 4 (int8 activations, fastest on x86) or 0 (float activations)",
        )


def _threads() -> int:
    from qtool.hardware import available_cores

    return max(1, min(4, available_cores()))


def apply_weight_only(
    model: ir.Model,
    recipe: Recipe,
    bits: int,
    *,
    activations: dict[str, np.ndarray | ActivationStats] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    executor=None,  # noqa: ANN001 - qtool.executors.Executor
) -> PassReport:
    """Quantize the constant weights of MatMul, Gemm and Gather in place (see module doc).

    ``bits``: 2, 3, 4 or 8 (per-layer ``[[layer]]`` overrides and ``keep_8bit`` patterns
    win). ``activations``: for gptq/awq, per MatMul input tensor name either sample rows
    [..., K] or accumulated :class:`ActivationStats` (``collect_weight_only_stats``).
    ``on_progress(done_bytes, total_bytes)`` counts fp32 weight bytes processed.
    ``executor`` (qtool.executors): gptq/awq layers run there, each independent given its
    recorded input statistics, with results identical to a run in this process.
    Modifies ``model`` in place; the caller saves it (never over the input file).
    """
    wo = recipe.weight_only
    fmt, algorithm = wo.format, wo.algorithm
    _check(recipe, bits, fmt, algorithm)
    report = PassReport("weight_only")
    items = find_items(model, recipe, bits, report)
    if algorithm in DATA_AWARE and not activations:
        raise UsageError(
            f"--algorithm {algorithm} needs calibration activations",
            "pass --data DIR (sample inputs), or use a data-free algorithm: rtn, mse or hqq",
        )
    _attach_stats(items, activations, algorithm, report)
    if fmt == "matmulnbits":
        _attach_bias_adds(items)
    _prepare_model(model, recipe, items, fmt)
    if fmt == "matmulnbits":
        _fit_gather_blocks(items, wo.block_size, report)
    _quantize_and_rewrite(model, items, recipe, fmt, report, on_progress, executor)
    return report


def _attach_stats(items: list[Item], activations, algorithm: str, report: PassReport) -> None:
    """Give each MatMul/Gemm item the statistics of its input (gptq/awq); count fallbacks."""
    stats = {}
    for name, value in (activations or {}).items():
        stats[name] = value if isinstance(value, ActivationStats) else ActivationStats.from_activations(value)
    for item in items:
        if item.kind in ("matmul", "gemm"):
            item.stats = stats.get(item.node.inputs[0].name)
            if algorithm in DATA_AWARE and item.stats is None:
                report.count(f"{algorithm} without activations (mse used)")
        elif item.kind == "conv" and algorithm not in CONV_ALGORITHMS:
            report.count(f"Conv: {algorithm} has no Conv form (mse used)")


def _attach_bias_adds(items: list[Item]) -> None:
    """MatMulNBits takes a bias: each MatMul's following bias Add is folded into it."""
    for item in items:
        if item.kind == "matmul":
            _, n = item.weight.const_value.shape
            found = ops.bias_add_consumer(item.node, n)
            if found is not None:
                item.add, item.bias = found


def _prepare_model(model: ir.Model, recipe: Recipe, items: list[Item], fmt: str) -> None:
    """Raise the opset/IR version blocked DequantizeLinear needs, import com.microsoft."""
    # Conv weights are blocked DequantizeLinear in either format.
    dq_items = items if fmt == "qdq" else [i for i in items if i.kind == "conv"]
    if dq_items:
        need = max(dq_opset(i.bits) for i in dq_items)
        require_opset(model, need, f"blocked DequantizeLinear with {min(i.bits for i in dq_items)}-bit weights",
                      recipe.quantize.allow_opset_upgrade)
        model.ir_version = max(model.ir_version or 0, 10 if need == 21 else 13)
    if fmt == "matmulnbits" and len(dq_items) < len(items):
        model.opset_imports.setdefault(MS_DOMAIN, 1)


def _fit_gather_blocks(items: list[Item], block_size: int, report: PassReport) -> None:
    """GatherBlockQuantized needs whole blocks along D: halve the block until one divides the
    table width, or drop the item (with the reason) when none of 16 or more does."""
    for item in [i for i in items if i.kind == "gather"]:
        d = item.weight.const_value.shape[1]
        block = block_size
        while block >= 16 and d % block:
            block //= 2
        if item.bits == 2 or block < 16:
            report.skip(item_name(item.node), f"GatherBlockQuantized needs 4/8 bits and a block (>= 16) dividing {d}")
            items.remove(item)
        elif block != block_size:
            item.block = block
            report.notes.append(f"{item_name(item.node)}: table width {d} is not a multiple of {block_size}; blocks of {block}")


def _quantize_and_rewrite(
    model: ir.Model, items: list[Item], recipe: Recipe, fmt: str, report: PassReport,
    on_progress: Callable[[int, int], None] | None, executor=None,  # noqa: ANN001
) -> None:
    """Quantize the items (a few ahead, in threads) and rewrite each in order, releasing its
    fp32 weight as soon as the quantized replacement is in the graph; then summarize."""
    wo, algorithm = recipe.weight_only, recipe.weight_only.algorithm
    names = Names(model)
    total = sum(i.nbytes for i in items)
    done = 0
    weight_err = rtn_err = 0.0
    out_errs: list[tuple[float, float]] = []
    if on_progress is not None:
        on_progress(0, total)

    def work(it: Item) -> QuantOutcome:
        return quantize_conv(it, wo, algorithm) if it.kind == "conv" else quantize_item(it, wo, algorithm, fmt)

    outcomes = (_pipelined(items, work) if executor is None or algorithm not in DATA_AWARE
                else _fanned_out(items, work, executor, wo, algorithm))
    for item, outcome in outcomes:
        graph = item.node.graph
        drop_unused_initializers(graph, rewrite(graph, names, item, outcome, wo, fmt))
        report.count(f"{_KEYS[item.kind]} -> {_TARGETS.get((item.kind, fmt), 'DequantizeLinear')} ({item.bits}-bit)")
        if item.add is not None:
            report.count("bias Add folded into MatMulNBits")
        if outcome.input_scale is not None:
            report.count("awq activation scale (Mul) inserted")
        size = item.nbytes // 4
        weight_err += outcome.weight_mse * size
        rtn_err += outcome.rtn_weight_mse * size
        if outcome.output_error is not None:
            out_errs.append((outcome.output_error, outcome.rtn_output_error))
        done += item.nbytes
        if on_progress is not None:
            on_progress(done, total)
    _summarize(items, recipe, fmt, total, weight_err, rtn_err, out_errs, report)


def _summarize(items: list[Item], recipe: Recipe, fmt: str, total: int, weight_err: float, rtn_err: float,
               out_errs: list[tuple[float, float]], report: PassReport) -> None:
    """Notes: the algorithm's error against RTN, and the format's caveats."""
    wo, algorithm = recipe.weight_only, recipe.weight_only.algorithm
    if items and algorithm == "rtn" and np.isnan(weight_err):
        report.notes.append(f"rtn: {len(items)} tensors (error not measured on the fast path; any other algorithm reports it vs RTN)")
    elif items:
        n_weights = total // 4
        report.notes.append(
            f"{algorithm}: weight MSE {weight_err / n_weights:.3e} vs RTN {rtn_err / n_weights:.3e} "
            f"({(weight_err / rtn_err if rtn_err else 1.0):.3f}x) over {len(items)} tensors"
            if algorithm != "rtn"
            else f"rtn: weight MSE {weight_err / n_weights:.3e} over {len(items)} tensors"
        )
        if out_errs:
            ours = float(np.mean([o for o, _ in out_errs]))
            base = float(np.mean([r for _, r in out_errs]))
            report.notes.append(
                f"{algorithm}: relative output error {ours:.3e} vs RTN {base:.3e} ({ours / base if base else 1.0:.3f}x)"
            )
    if fmt == "matmulnbits" and wo.accuracy_level in (0, 1) and any(i.kind in ("matmul", "gemm") for i in items):
        report.notes.append(_SLOW_LEVEL_NOTE.format(level=wo.accuracy_level))
    if any(i.bits == 3 for i in items):
        report.notes.append("3-bit codes are stored in 4-bit containers (ONNX has no 3-bit type): no size gain over 4-bit")


def _fanned_out(items: list[Item], work: Callable[[Item], QuantOutcome], executor, wo,  # noqa: ANN001
                algorithm: str) -> Iterator[tuple[Item, QuantOutcome]]:
    """Yield (item, outcome) in order, the gptq/awq layers computed on ``executor`` a few
    per worker at a time (so only that many fp32 weights are in flight), the rest here."""
    window = max(2, 2 * executor.workers)
    for start in range(0, len(items), window):
        chunk = items[start:start + window]
        args = [data_aware_args(item, wo, algorithm) for item in chunk]
        calls = [(f"{algorithm} {item_name(item.node)}", a) for item, a in zip(chunk, args) if a is not None]
        remote = iter(executor.call_each(quantize_weight, calls) if calls else [])
        for item, a in zip(chunk, args):
            yield item, (next(remote) if a is not None else work(item))


def _pipelined(items: list[Item], work: Callable[[Item], QuantOutcome]) -> Iterator[tuple[Item, QuantOutcome]]:
    """Yield (item, work(item)) in order, computing up to ``_threads()`` items ahead.

    numpy and the native kernels (cffi calls) release the GIL, so tensors quantize in
    parallel while at most that many fp32 weights are resident.
    """
    threads = _threads()
    if threads == 1 or len(items) < 2:
        for item in items:
            yield item, work(item)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        with one_blas_thread():
            futures = []
            nxt = 0
            for i in range(len(items)):
                while nxt < len(items) and nxt < i + threads:
                    futures.append(pool.submit(work, items[nxt]))
                    nxt += 1
                outcome = futures[i].result()
                futures[i] = None
                yield items[i], outcome
    finally:
        # On an error or Ctrl-C, queued tensors are dropped instead of waited for (the one
        # running per thread still finishes; the caller is not held until then).
        pool.shutdown(wait=False, cancel_futures=True)
