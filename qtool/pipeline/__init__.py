"""The conversion pipeline the library owns; the CLI and ``import qtool`` both call it.

    load -> prepare (pre-process; calibrate | collect statistics) -> the scheme's passes
    (``schemes.SCHEMES``) -> save (atomic, verified) -> measure

``convert_model`` converts an in-memory model; ``convert_file`` runs the whole flow from a
path to a written, verified file and returns the report ``qtool convert --json`` prints.
"""

from qtool.pipeline.context import Context
from qtool.pipeline.fidelity import fidelity
from qtool.pipeline.flow import calibrate, convert_file, convert_model, prepare
from qtool.pipeline.opset import upgrade_opset
from qtool.pipeline.plan import ConvertPlan, plan_for, weight_only_part
from qtool.pipeline.schemes import SCHEMES, Converted, run_scheme
from qtool.pipeline.summary import ConvertSummary
from qtool.pipeline.tables import check_table, remap_folded_ranges

__all__ = [
    "SCHEMES",
    "Context",
    "ConvertPlan",
    "ConvertSummary",
    "Converted",
    "calibrate",
    "check_table",
    "convert_file",
    "convert_model",
    "fidelity",
    "plan_for",
    "prepare",
    "remap_folded_ranges",
    "run_scheme",
    "upgrade_opset",
    "weight_only_part",
]
