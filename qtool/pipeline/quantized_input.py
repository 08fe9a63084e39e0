"""Convert a model that is quantized already: store its fake-quant weights as integers or
re-target it (the ``quantized-input`` scheme), or dequantize it for ``--requantize``.

``qtool.pipeline.plan.plan_quantized_input`` decides which; ``convert_file`` calls here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.pipeline.plan import ConvertPlan


def dequantized(model: ir.Model) -> tuple[ir.Model, PassReport]:
    """A float copy of ``model`` (qtool.passes.fake_quant.dequantize) and its report; raises
    ConversionError when something quantized is left (integer operators), so the normal flow
    never quantizes on top of quantized ops."""
    from qtool.errors import ConversionError
    from qtool.passes.fake_quant import dequantize
    from qtool.passes.qoperator_to_qdq import to_qdq
    from qtool.quantized import recognize

    work = model.clone()
    as_qdq = to_qdq(work)  # integer operators first become DQ -> float op -> Q, dequantized below
    report = dequantize(work)
    for key, n in as_qdq.counts.items():
        report.count(key, n)
    left = recognize(work)
    if left.quantized:
        raise ConversionError(
            f"--requantize could not dequantize everything ({left.summary()}); converting would quantize twice",
            "--requantize handles QDQ, QOperator and fake-quant models; dynamic and low-bit "
            "operators (MatMulInteger, DynamicQuantizeLSTM, MatMulNBits...) stay as they are: "
            "convert the float parent instead",
        )
    return work, report


def convert_quantized(source: ir.Model, model_path: Path, output: str | os.PathLike, recipe: Recipe,
                      plan: ConvertPlan, *, data=None, external_data: bool = False,  # noqa: ANN001
                      started: float | None = None) -> dict:
    """Run the ``quantized-input`` scheme on ``source``, save it (atomic, verified) and return
    the report ``convert --json`` prints; with ``data``, the first sample's outputs are
    compared with the input model's (``identical``: bit for bit)."""
    from qtool.model import add_provenance, model_size_bytes, save
    from qtool.pipeline.context import Context
    from qtool.pipeline.flow import has_external_data, size_warning
    from qtool.pipeline.schemes import run_scheme
    from qtool.quantized import recognize

    started = time.perf_counter() if started is None else started
    context = Context(recipe, source)
    context.plan = plan
    converted = run_scheme(source, context)
    add_provenance(converted.model, {"quantized-input": plan.format}, source=str(model_path))
    saved = save(converted.model, output, input_path=model_path,
                 external_data=True if external_data or has_external_data(source) else None)
    in_size, out_size = model_size_bytes(model_path), saved.bytes_written
    report = {
        "model": str(model_path), "output": str(saved.path), "recipe": None,
        "mode": plan.kind, "format": plan.format, "seconds": round(time.perf_counter() - started, 3),
        "size_bytes": {"input": in_size, "output": out_size},
        "size_ratio": round(out_size / in_size, 4) if in_size else None,
        "ops": converted.summary.to_dict(),
        "passes": [{"name": p.name, "counts": p.counts, "notes": p.notes[:50],
                    "skipped": dict(list(p.skipped.items())[:50])} for p in converted.reports],
        "quantized": {"input": recognize(source).to_dict(), "output": recognize(converted.model).to_dict()},
        "fidelity": None, "identical": None, "warnings": [], "passed": True, "failure": None, "hint": None,
    }
    if (warning := size_warning(in_size, out_size)) is not None:
        report["warnings"].append(warning)
    if data is not None:
        report["fidelity"], report["identical"] = _compare_first_sample(model_path, saved.path, data, recipe)
    return report


def _compare_first_sample(reference: Path, candidate: Path, data, recipe: Recipe) -> tuple[dict | None, bool]:  # noqa: ANN001
    """(cosine/SQNR, whether every output is bit-identical) on the first sample of ``data``."""
    from qtool import runtime
    from qtool.data import Dataset, input_specs
    from qtool.model import load
    from qtool.pipeline.fidelity import fidelity

    dataset = Dataset(data, input_specs(load(reference)), recipe.preprocess)
    if len(dataset) == 0:
        return None, False
    feed = dataset.load_sample(0)
    outs = [list(runtime.run(runtime.open_session(p, "cpu", role=r), feed).values())
            for p, r in ((reference, "reference"), (candidate, "candidate"))]
    same = all(np.array_equal(a, b) for a, b in zip(*outs, strict=True))
    floats = [(a, b) for a, b in zip(*outs, strict=True) if getattr(a, "dtype", None) is not None and a.dtype.kind == "f"]
    fid = fidelity([a for a, _ in floats], [b for _, b in floats]) if floats and not same else None
    return fid, same
