"""qtool: compress ONNX models and prove the result.

The command line (``qtool ...``) is a thin shell over this API; each function does what
the command of the same name does, with the same recipes and the same outputs::

    import qtool

    table = qtool.calibrate("model.onnx", "calib/")              # a CalibrationTable
    table.save("table.json")
    report = qtool.convert("model.onnx", "int8.onnx", calib="table.json")
    result = qtool.evaluate("int8.onnx", "eval/", reference="model.onnx")
    tuned = qtool.tune("model.onnx", "calib/", "tuned.onnx", max_drop="1%")

``recipe`` is a preset name (``int8-static``, ``int8-dynamic``, ``int4-weight-only``,
``fp16``), a path to a TOML recipe, or a ``qtool.config.Recipe``. Errors are
``qtool.errors.QtoolError`` subclasses carrying a message and a hint.
In-memory models: ``qtool.load``, ``qtool.pipeline.convert_model``, ``qtool.save``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import onnx_ir as ir

    from qtool.calibration import CalibrationTable
    from qtool.config import Recipe

__all__ = ["__version__", "calibrate", "convert", "evaluate", "load", "load_recipe", "save", "tune"]

PathLike = str | os.PathLike


def load_recipe(recipe: Recipe | PathLike | None = None, default: str | None = None) -> Recipe:
    """``recipe`` as a Recipe: itself, a preset by name, or a TOML file (None: ``default``)."""
    from qtool.config import Recipe
    from qtool.config import load_recipe as _load

    if isinstance(recipe, Recipe):
        return recipe
    return _load(recipe if recipe is not None else default)


def calibrate(model: PathLike | ir.Model, data: PathLike, recipe: Recipe | PathLike | None = None,
              **options: Any) -> CalibrationTable:
    """Observe the activations conversion will quantize over the samples in ``data``
    (``qtool calibrate``); options: ``shard=(i, n)``, ``on_progress``, ``threads``."""
    from qtool.pipeline import calibrate as _calibrate

    return _calibrate(model, data, load_recipe(recipe), **options)


def convert(model: PathLike, output: PathLike, recipe: Recipe | PathLike | None = None, *,
            data: PathLike | None = None, calib: PathLike | None = None,
            eval_data: PathLike | None = None, guard: bool = True, floor=None,  # noqa: ANN001
            budget_s: float | None = None, write_best: bool = False,
            external_data: bool = False, progress=None) -> dict:  # noqa: ANN001
    """Convert ``model`` into ``output`` as ``qtool convert`` does, and return its report.

    With ``data`` and ``guard`` (the default), candidates are measured on held-out samples
    (``eval_data``, or every 5th sample of ``data``) against ``floor`` (a
    qtool.pipeline.guard.Floor; default 15 dB worst output segment, 0.9 argmax agreement)
    and repaired; with no ``recipe`` the guard also chooses the scheme (``--scheme auto``).
    Raises GateFailed (its ``report`` attribute holds the report) when nothing meets the
    floor or nothing was compressed. Without data the recipe decides (default:
    int8-static, which then needs ``calib``). ``progress``: see qtool.pipeline.progress.
    """
    from qtool.errors import GateFailed
    from qtool.pipeline import convert_file, plan_for
    from qtool.pipeline.guard import Floor
    from qtool.pipeline.plan import check_inputs
    from qtool.pipeline.progress import no_progress

    r = load_recipe(recipe, default="int8-static")
    check_inputs(r, plan_for(r), calib=calib, data=data)
    report = convert_file(model, output, r, data=data, calib=calib, external_data=external_data,
                          progress=progress or no_progress, guard=(floor or Floor()) if guard else None,
                          eval_data=eval_data, auto=recipe is None, budget_s=budget_s,
                          write_best=write_best)
    if not report["passed"]:
        error = GateFailed(report["failure"], report["hint"])
        error.report = report
        raise error
    return report


def evaluate(candidate: PathLike, data: PathLike, **options: Any):  # noqa: ANN201 - EvalReport
    """Accuracy, fidelity, latency and gates of ``candidate`` (``qtool eval``); options as
    qtool.eval.evaluate.evaluate (``reference=``, ``labels=``, ``latency=``, gates...)."""
    from qtool.eval.evaluate import evaluate as _evaluate

    return _evaluate(candidate, data, **options)


def tune(model: PathLike, data: PathLike, output: PathLike, **options: Any):  # noqa: ANN201 - TuneResult
    """The smallest mixed-precision model within an accuracy budget (``qtool tune``);
    options as qtool.tuning.tune (``max_drop=``, ``target_mb=``, ``bits=``, ``eval_data=``...)."""
    from qtool.tuning import tune as _tune

    return _tune(model, data, output, **options)


def load(path: PathLike) -> ir.Model:
    """An ONNX model as an onnx-ir Model (external data read lazily)."""
    from qtool.model import load as _load

    return _load(path)


def save(model: ir.Model, path: PathLike, **options: Any):  # noqa: ANN201 - SaveResult
    """Write ``model`` atomically and check that onnxruntime loads it (qtool.model.save)."""
    from qtool.model import save as _save

    return _save(model, path, **options)
