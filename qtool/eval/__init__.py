"""`qtool eval`: accuracy, latency and size of a compressed model against its original,
with CI gates, layer-wise diagnosis and hardware checks.

    from qtool.eval import evaluate
    report = evaluate("int8.onnx", "eval/", reference="model.onnx", max_drop=0.01)
    report.passed, report.to_dict()
"""

from qtool.eval.evaluate import evaluate
from qtool.eval.gates import GateResult, check_gates, raise_on_failure
from qtool.eval.report import SCHEMA_VERSION, EvalReport, to_markdown, validate

__all__ = [
    "SCHEMA_VERSION", "EvalReport", "GateResult", "check_gates", "evaluate", "raise_on_failure",
    "to_markdown", "validate",
]
