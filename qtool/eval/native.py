"""``--backend native``: run the candidate's integer layers through qtool's own kernels and
compare them with onnxruntime on the same inputs.

Layers handled (found in the candidate graph, weights constant):

- ``MatMulInteger`` (uint8 activations x int8 weights, as dynamic int8 produces):
  ``C = (A - a_zp) (W - w_zp)`` exact int32 via ``gemm_u8s8``; compared exactly
  (``exact_match_rate`` = fraction of equal int32 elements).
- ``MatMulNBits`` with ``bits = 4``: ``Y = A W (+ bias)`` with W dequantized per block via
  ``gemm_q4``; compared as floats (max abs difference, SQNR). onnxruntime's
  ``accuracy_level = 4`` quantizes A to int8 on the fly, so a small difference is expected.

Each layer's inputs and onnxruntime's output are exposed from one session
(``qtool.runtime.build_session``); the first ``MAX_BATCHES`` batches are used.
Kernel throughput is ``2 M N K / t`` in GOP/s over the native calls.
The kernels come from ``qtool.kernels`` (the C library when built, else its numpy twins).
"""

from __future__ import annotations

import os
import time

import numpy as np

from qtool.eval.metrics import sqnr_db

MAX_BATCHES = 8


def kernel_module():
    """``qtool.kernels`` when it exports the GEMMs, else the numpy reference twins."""
    try:
        from qtool import kernels

        if hasattr(kernels, "gemm_u8s8") and hasattr(kernels, "gemm_q4"):
            return kernels, getattr(kernels, "BACKEND", "native")
    except Exception:  # noqa: BLE001,S110 - a missing or broken build falls back to numpy
        pass
    from qtool.kernels import reference

    return reference, "numpy-reference"


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def find_layers(proto) -> list[dict]:
    """Integer layers of ``proto`` the native kernels can run, with their constant weights."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    layers = []
    for node in proto.graph.node:
        if node.op_type == "MatMulInteger":
            w = const(node.input[1])
            if w is None or w.dtype != np.int8 or w.ndim != 2:
                continue
            wzp = const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.int8(0)
            if wzp is None:
                continue
            layers.append({
                "kind": "gemm_u8s8", "node": node.name or node.output[0], "a": node.input[0],
                "a_zp": node.input[2] if len(node.input) > 2 else "", "output": node.output[0],
                "b_t": np.ascontiguousarray(w.T),
                "b_zp": np.broadcast_to(np.asarray(wzp, np.int8).reshape(-1), (w.shape[1],)).copy(),
            })
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and _attr(node, "bits", 4) == 4:
            b, scales = const(node.input[1]), const(node.input[2])
            zp = const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if b is None or scales is None or (len(node.input) > 3 and node.input[3] and zp is None):
                continue
            if len(node.input) > 4 and node.input[4]:
                continue  # g_idx (act-order): not handled natively
            bias = const(node.input[5]) if len(node.input) > 5 and node.input[5] else None
            if len(node.input) > 5 and node.input[5] and bias is None:
                continue
            if zp is not None and zp.dtype != np.uint8:
                continue
            layers.append({
                "kind": "gemm_q4", "node": node.name or node.output[0], "a": node.input[0],
                "output": node.output[0], "b": b, "scales": scales, "zp": zp,
                "K": int(_attr(node, "K")), "block_size": int(_attr(node, "block_size")), "bias": bias,
            })
    return layers


class NativeComparison:
    """Accumulates, batch by batch, native-vs-onnxruntime agreement for each integer layer."""

    def __init__(self, candidate: str | os.PathLike, threads: int = 0) -> None:
        import onnx

        from qtool.model import load
        from qtool.runtime import build_session

        self.kernels, self.backend = kernel_module()
        self.layers = find_layers(onnx.load(str(candidate), load_external_data=False))
        self.warnings: list[str] = []
        if not self.layers:
            self.warnings.append(
                "--backend native: the candidate has no MatMulInteger / 4-bit MatMulNBits layer "
                "with constant weights; nothing to compare"
            )
        if self.backend == "numpy-reference":
            self.warnings.append(
                "--backend native: qtool's C kernels are not available; used their numpy twins"
            )
        names = []
        for layer in self.layers:
            names += [n for n in (layer["a"], layer.get("a_zp", ""), layer["output"]) if n]
        self.session = None
        if self.layers:
            self.session, _ = build_session(load(candidate), names, threads=threads)
            self.inputs = {i.name for i in self.session.get_inputs()}
        self.names = list(dict.fromkeys(names))
        self.batches = 0
        self.stats = {layer["node"]: {"equal": 0, "elements": 0, "max_abs": 0.0, "signal": 0.0,
                                      "noise": 0.0, "ops": 0.0, "seconds": 0.0} for layer in self.layers}

    def update(self, feed: dict[str, np.ndarray]) -> None:
        if self.session is None or self.batches >= MAX_BATCHES:
            return
        self.batches += 1
        values = dict(zip(self.names, self.session.run(
            self.names, {k: v for k, v in feed.items() if k in self.inputs})))
        for layer in self.layers:
            a = values[layer["a"]]
            k = a.shape[-1]
            rows = a.reshape(-1, k)
            want = values[layer["output"]]
            start = time.perf_counter()
            if layer["kind"] == "gemm_u8s8":
                a_zp = int(values[layer["a_zp"]]) if layer.get("a_zp") else 0
                got = self.kernels.gemm_u8s8(np.ascontiguousarray(rows), layer["b_t"], a_zp, layer["b_zp"])
                n = layer["b_t"].shape[0]
            else:
                got = self.kernels.gemm_q4(np.ascontiguousarray(rows, dtype=np.float32), layer["b"],
                                           layer["scales"], layer["zp"], layer["K"], layer["block_size"])
                if layer["bias"] is not None:
                    got = got + layer["bias"].astype(np.float32)
                n = layer["b"].shape[0]
            s = self.stats[layer["node"]]
            s["seconds"] += time.perf_counter() - start
            s["ops"] += 2.0 * rows.shape[0] * n * k
            want = want.reshape(got.shape)
            diff = want.astype(np.float64) - got.astype(np.float64)
            s["equal"] += int(np.sum(want == got))
            s["elements"] += got.size
            s["max_abs"] = max(s["max_abs"], float(np.max(np.abs(diff))) if diff.size else 0.0)
            s["signal"] += float(np.sum(want.astype(np.float64) ** 2))
            s["noise"] += float(np.sum(diff * diff))

    def results(self) -> list[dict]:
        out = []
        for layer in self.layers:
            s = self.stats[layer["node"]]
            out.append({
                "a": "onnxruntime", "b": f"native:{layer['kind']} ({self.backend})",
                "output": layer["output"], "node": layer["node"],
                "sqnr_db": sqnr_db(s["signal"], s["noise"]), "max_abs": s["max_abs"],
                "argmax_agreement": None,
                "exact_match_rate": s["equal"] / s["elements"] if s["elements"] else None,
                "gops": s["ops"] / s["seconds"] / 1e9 if s["seconds"] else None,
            })
        return out
