"""Which runtime runs a model: ``ort`` (onnxruntime, any installed execution provider) or
``openvino`` (the ``openvino`` package, optional). A ``Runtime`` is a validated choice of
runtime + device + precision hint; ``open`` gives a session-like object (see the package
docstring) that qtool's latency code, evaluation and the guard use without knowing which.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qtool.errors import UsageError

NAMES = ("ort", "openvino")
_ALIASES = {"ort": "ort", "onnxruntime": "ort", "openvino": "openvino", "ov": "openvino"}


@dataclass(frozen=True)
class Runtime:
    """A runtime and its hints. ``device``: the execution provider's short name for ort
    (``cpu``, ``cuda``...), the OpenVINO device (``CPU``, ``GPU``...) for openvino.
    ``precision``: openvino only, ``f32`` | ``bf16`` | ``default``."""

    name: str = "ort"
    device: str = "cpu"
    precision: str | None = None

    @property
    def label(self) -> str:
        """``cpu`` for onnxruntime's CPU provider (as reports always said), else
        ``onnxruntime:cuda``, ``openvino:CPU:bf16`` ..."""
        if self.name == "ort":
            return self.device if self.device == "cpu" else f"onnxruntime:{self.device}"
        return f"openvino:{self.device}:{self.precision or 'default'}"

    @property
    def display(self) -> str:
        """The label with the runtime always named (for tables that mix runtimes)."""
        return f"onnxruntime:{self.device}" if self.name == "ort" else self.label

    def open(self, model: str | os.PathLike, *, threads: int = 0, role: str = "model"):  # noqa: ANN201
        """A session on this runtime for the model file ``model`` (see the package docstring)."""
        if self.name == "openvino":
            from qtool.runtime import openvino

            return openvino.open_session(model, device=self.device, precision=self.precision,
                                         threads=threads, role=role)
        from qtool.runtime.sessions import open_session

        return open_session(model, self.device, threads=threads, role=role)

    def with_precision(self, precision: str | None) -> Runtime:
        return Runtime(self.name, self.device, precision)


ORT_CPU = Runtime()


def canonical(name: str) -> str:
    """``onnxruntime``/``ort`` -> ``ort``, ``openvino``/``ov`` -> ``openvino``; else UsageError."""
    key = _ALIASES.get((name or "").strip().lower())
    if key is None:
        raise UsageError(f"unknown runtime {name!r}", f"use one of {', '.join(NAMES)} (e.g. --runtime openvino)")
    return key


def runtime(name: str = "ort", device: str | None = None, precision: str | None = None) -> Runtime:
    """A validated Runtime; unknown names, devices that are not here and hints that do not
    apply to the runtime (``precision`` with onnxruntime) raise UsageError."""
    key = canonical(name)
    if key == "ort":
        if precision is not None:
            raise UsageError("--precision applies to --runtime openvino only",
                             "onnxruntime runs the model's own types; drop --precision or add --runtime openvino")
        from qtool.runtime.sessions import provider_name

        device = (device or "cpu").lower()
        provider_name(device)  # UsageError naming what is available
        return Runtime("ort", device, None)
    from qtool.runtime import openvino

    device, precision = openvino.check_hints(device, precision)
    return Runtime("openvino", device, precision)


def parse_list(text: str) -> list[str]:
    """``ort,openvino`` -> ["ort", "openvino"], each name checked, no repeats."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not names:
        raise UsageError("--runtimes needs at least one runtime", "e.g. --runtimes ort,openvino")
    out = []
    for n in names:
        key = _ALIASES.get(n.lower())
        if key is None:
            raise UsageError(f"unknown runtime {n!r} in --runtimes", f"use names from {', '.join(NAMES)}")
        if key in out:
            raise UsageError(f"runtime {n!r} is listed twice in --runtimes", "name each runtime once")
        out.append(key)
    return out
