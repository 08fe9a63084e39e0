"""OpenVINO as a runtime: read the ONNX file directly, compile it for a device with a
precision hint, and run it behind the subset of onnxruntime's InferenceSession that qtool
uses (``get_inputs()``, ``get_outputs()``, ``run(names, feed)``), so the latency code, the
guard and evaluation time and compare it exactly as they do an onnxruntime session.

Properties set at compile time (OpenVINO's documented keys, ``openvino.properties``):

- ``PERFORMANCE_HINT=LATENCY``: one inference request at a time, batch 1, which is what
  qtool times (THROUGHPUT would spread streams over the cores and time something else);
- ``INFERENCE_NUM_THREADS`` when ``threads`` > 0 (as onnxruntime's intra-op threads);
- ``INFERENCE_PRECISION_HINT``: ``f32`` or ``bf16``; ``default`` sets nothing, and the
  device chooses (the CPU plugin runs float models in bf16 where AMX/AVX512-BF16 exist).
  The precision the compiled model really uses is read back (``session.precision``).

The package is an optional extra: without it, :func:`load_openvino` raises a QtoolError
that names ``pip install 'qtool[openvino]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import ModelError, QtoolError, UsageError

PRECISIONS = ("f32", "bf16", "default")
DEFAULT_DEVICE = "CPU"
EXTRA_HINT = "install the extra: pip install 'qtool[openvino]'"

# OpenVINO element types as onnxruntime's NodeArg spells tensor types, for get_inputs().
_ORT_TYPES = {
    "f32": "tensor(float)", "f16": "tensor(float16)", "bf16": "tensor(bfloat16)", "f64": "tensor(double)",
    "i64": "tensor(int64)", "i32": "tensor(int32)", "i16": "tensor(int16)", "i8": "tensor(int8)",
    "u8": "tensor(uint8)", "u16": "tensor(uint16)", "boolean": "tensor(bool)",
}


class MissingExtraError(QtoolError):
    """An optional dependency of qtool is not installed."""


def load_openvino():  # noqa: ANN201 - the openvino module
    """The ``openvino`` module, or a QtoolError naming the extra that installs it."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingExtraError(
            f"the OpenVINO runtime needs the openvino package, which is not importable here ({exc})",
            EXTRA_HINT,
        ) from None
    return openvino


@dataclass(frozen=True)
class Port:
    """One input or output, shaped like onnxruntime's NodeArg (name, shape, type)."""

    name: str
    shape: list
    type: str


class OpenVINOSession:
    """A compiled OpenVINO model behind InferenceSession's run/get_inputs/get_outputs."""

    def __init__(self, compiled, device: str, precision: str, hint: str) -> None:  # noqa: ANN001
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.device = device
        self.precision = precision  # what the compiled model runs float in (read back)
        self.hint = hint  # what was asked: f32 | bf16 | default
        self._outputs = [_port(p) for p in compiled.outputs]
        self._inputs = [_port(p) for p in compiled.inputs]
        self._index = {p.name: i for i, p in enumerate(self._outputs)}
        for i, port in enumerate(compiled.outputs):  # every alias of an output finds it
            for alias in port.get_names():
                self._index.setdefault(alias, i)

    def get_inputs(self) -> list[Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[Port]:
        return list(self._outputs)

    def run(self, names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:  # noqa: ANN001
        """Outputs ``names`` (all when None) for ``feed``, in that order, as owned arrays."""
        names = list(names) if names is not None else [p.name for p in self._outputs]
        self.request.infer(feed)
        # Copies of the request's own output tensors (it reuses them on the next call). Not
        # the dict infer() returns: made and dropped on every call, it made OpenVINO
        # reallocate a PP-OCR recognizer's output each time, 0.3-0.7 ms of a 4.5 ms inference
        # (bench/results/targets.md).
        return [self.request.get_output_tensor(self._index[n]).data.copy() for n in names]


def _port(port) -> Port:  # noqa: ANN001 - openvino ConstOutput
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    kind = port.get_element_type().get_type_name()
    return Port(port.get_any_name(), shape, _ORT_TYPES.get(kind, f"tensor({kind})"))


def devices() -> list[str]:
    return list(load_openvino().Core().available_devices)


def check_hints(device: str | None, precision: str | None) -> tuple[str, str]:
    """(device, precision) validated: the device must exist here, the precision be known."""
    precision = (precision or "default").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r} for openvino",
                         f"use one of {', '.join(PRECISIONS)} (default: the device chooses; bf16 on AMX CPUs)")
    device = (device or DEFAULT_DEVICE).upper()
    available = devices()
    if device not in available and device.split(".")[0] not in available:
        raise UsageError(f"OpenVINO device {device!r} is not available here",
                         f"available: {', '.join(available) or 'none'} (e.g. --device CPU)")
    return device, precision


def open_session(model: str | os.PathLike, *, device: str | None = None, precision: str | None = None,
                 threads: int = 0, role: str = "model") -> OpenVINOSession:
    """Read the ONNX file ``model`` and compile it for ``device`` (see the module docstring)."""
    ov = load_openvino()
    props = ov.properties
    device, precision = check_hints(device, precision)
    if not Path(model).exists():
        raise ModelError(f"{role} model not found: {model}", "check the path")
    config = {props.hint.performance_mode: props.hint.PerformanceMode.LATENCY}
    if threads > 0:
        config[props.inference_num_threads] = int(threads)
    if precision != "default":
        config[props.hint.inference_precision] = ov.Type.f32 if precision == "f32" else ov.Type.bf16
    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(model)), device, config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for everything
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"OpenVINO cannot compile the {role} model {model} for {device}: {first}",
                         "check that this OpenVINO version supports the model's ops (or use --runtime ort)") from None
    try:
        actual = compiled.get_property(props.hint.inference_precision).get_type_name()
    except Exception:  # noqa: BLE001 - a device without the property: say what was asked
        actual = precision
    return OpenVINOSession(compiled, device, actual, precision)


def default_precision(device: str | None = None) -> str:
    """The float precision ``device`` runs when no hint is given (``bf16`` on AMX CPUs)."""
    ov = load_openvino()
    device, _ = check_hints(device, None)
    try:
        return ov.Core().get_property(device, ov.properties.hint.inference_precision).get_type_name()
    except Exception:  # noqa: BLE001 - the device does not report one
        return "f32"


def version() -> str:
    return load_openvino().__version__
