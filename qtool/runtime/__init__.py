"""Running models: onnxruntime sessions (the one place their options are built) and
streaming a dataset's batches through them, with intermediate tensors exposed.

Calibration, conversion's fidelity check, evaluation, diagnosis and tune all run models
through here, so none of them depends on another for plumbing.
"""

from qtool.runtime.collect import (
    build_session,
    first_non_finite_sample,
    infer_types,
    raise_non_finite,
    stream_tensors,
)
from qtool.runtime.sessions import (
    PROVIDERS,
    open_session,
    provider_name,
    run,
    session_options,
    stream,
)

__all__ = [
    "PROVIDERS",
    "build_session",
    "first_non_finite_sample",
    "infer_types",
    "open_session",
    "provider_name",
    "raise_non_finite",
    "run",
    "session_options",
    "stream",
    "stream_tensors",
]
