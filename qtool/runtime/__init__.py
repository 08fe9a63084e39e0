"""Running models: onnxruntime sessions (the one place their options are built) and
streaming a dataset's batches through them, with intermediate tensors exposed; and the
runtimes a model can be deployed on (onnxruntime with any installed EP, OpenVINO).

Calibration, conversion's fidelity check, evaluation, diagnosis and tune all run models
through here, so none of them depends on another for plumbing.

Runtimes (for evaluation, the guard's timing, benchmarks)::

    from qtool.runtime import runtime, time_pairs
    ov = runtime("openvino", device="CPU", precision="f32")   # or runtime("ort"), runtime("ort", "cuda")
    session = ov.open("model.onnx", threads=2, role="candidate")
    session.get_inputs()        # [Port(name, shape, type)] like onnxruntime's NodeArg
    session.get_outputs()
    outs = session.run(None, {"input": x})   # list of arrays, all outputs (or the names given)
    session.precision           # openvino only: the float precision really used (bf16 on AMX)
    stats = time_pairs({"float": ("model.onnx", ov), "int8": ("int8.onnx", ov)}, {"input": x},
                       mode="process", runs=60, threads=2)   # LatencyStats per label

``runtime(name, device, precision)`` validates: an unknown name, a device that is not
here, a precision hint on onnxruntime raise UsageError; openvino without the package
raises a QtoolError naming ``pip install 'qtool[openvino]'``. An onnxruntime "session" is
the InferenceSession itself, an OpenVINO one (qtool.runtime.openvino) offers the same
``get_inputs``/``get_outputs``/``run``, so ``run``, ``stream`` and ``latency.measure``
below take either. ``time_pairs`` times in fresh processes (``process``, alternating
rounds; the honest default) or interleaved in this one (``inline``); see
qtool.runtime.timing. ``openvino.default_precision()`` says what float runs in by default.
"""

from qtool.runtime.runtimes import ORT_CPU, Runtime, runtime
from qtool.runtime.sessions import (
    PROVIDERS,
    open_session,
    provider_name,
    run,
    session_options,
    stream,
)

__all__ = [
    "ORT_CPU",
    "PROVIDERS",
    "Runtime",
    "build_session",
    "first_non_finite_sample",
    "infer_types",
    "open_session",
    "provider_name",
    "raise_non_finite",
    "run",
    "runtime",
    "session_options",
    "stream",
    "stream_tensors",
    "time_pairs",
]


def time_pairs(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - see qtool.runtime.timing.time_pairs
    """qtool.runtime.timing.time_pairs, imported when first used."""
    from qtool.runtime.timing import time_pairs as timed

    return timed(*args, **kwargs)


# Tensor collection needs onnx/onnx-ir (~2 s to import); a timing child process or a plain
# session does not, so those names load on first use.
_COLLECT = ("build_session", "first_non_finite_sample", "infer_types", "raise_non_finite", "stream_tensors")


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook (PEP 562)
    if name in _COLLECT:
        from qtool.runtime import collect

        return getattr(collect, name)
    raise AttributeError(f"module 'qtool.runtime' has no attribute {name!r}")
