"""What the guard measures: output fidelity that a concatenated head cannot hide, a task
proxy where one fits, and latency against float on the same runtime.

Per output, over the held-out samples:

- ``sqnr_db``: ``10 log10(sum r^2 / sum (r - c)^2)`` over the whole tensor;
- ``segment_sqnr_db``: the same per *segment*, the worst one. The channel axis (the
  smallest non-batch axis with 2+ entries: 84 in a YOLO head [N, 84, 8400], C in NCHW) is
  split into groups at every 10x jump between neighbouring channel magnitudes, so box
  coordinates in pixels and class probabilities concatenated into one tensor are judged
  apart while a classifier's logits stay one group;
- ``agreement``: argmax agreement along the last axis for classifier logits [N, C] and
  per-position scores [N, T, V] (greedy tokens, CTC characters); not for an output the
  graph shows to be features (``feature_outputs``: an encoder's normalised hidden state, a
  pooled or L2-normalised sentence embedding), whose largest component decides nothing.
  Where one class is float's choice at most positions of [N, T, V] scores (a CTC
  recognizer's blank: 74% of the positions of a PP-OCR line), positions where both models
  pick it are left out, as a mask's background is: counting them let a recognizer at 0.96
  agreement lose 4.6% of its characters, while its agreement on the other positions was 0.86. For a probability map
  ([N, 1, H, W] or [N, H, W] whose float values all lie in [0, 1]: text-detection, matting
  and saliency heads) the IoU of the two maps thresholded at 0.5, since SQNR on a map that
  is mostly background says little about the mask a user cuts from it; else None.
  ``positions`` counts the decisions (positions compared; pixels in the union for a map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

# Channels whose reference RMS is below this fraction of the output's largest channel RMS
# carry no signal worth a segment of their own.
SEGMENT_FLOOR = 1e-6
SEGMENT_GAP = 10.0  # a jump of 10x between neighbouring channel magnitudes starts a new group
MIN_VOCAB = 2  # last-axis size from which an argmax is a meaningful proxy
RANK3_MIN_VOCAB = 16  # [N, T, V]: V scores per position (tokens, characters)
MAP_MIN_PIXELS = 64  # a probability map has at least 8x8 positions per sample
MAP_THRESHOLD = 0.5
BACKGROUND_SHARE = 0.5  # a class float picks at more than half of the [N, T, V] positions


def common_part(r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The leading part both outputs have along every axis, when their shapes differ but not
    their rank (a length the model decides); otherwise the two as they are."""
    if r.shape == c.shape or r.ndim != c.ndim:
        return r, c
    common = tuple(slice(0, min(a, b)) for a, b in zip(r.shape, c.shape))
    return r[common], c[common]


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis whose slices form segments: the smallest non-batch axis with 2+ entries."""
    sizes = [(size, axis) for axis, size in enumerate(shape) if axis > 0 and size >= 2]
    return min(sizes)[1] if sizes else None


def proxy_applies(shape: tuple[int, ...]) -> bool:
    """Argmax along the last axis means something: [N, C] logits or [N, T, V] scores."""
    return (len(shape) == 2 and shape[1] >= MIN_VOCAB) or (len(shape) == 3 and shape[2] >= RANK3_MIN_VOCAB)


# Ops an output passes through unchanged in meaning (layout, shape, type, a selected token).
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Slice", "Gather"}
# Producers of scores: a classifier's last product, or a (log-)probability.
_SCORE_OPS = {"MatMul", "Gemm", "Softmax", "LogSoftmax", "Sigmoid", "MatMulNBits", "MatMulInteger",
              "DynamicQuantizeMatMul", "QGemm", "FusedMatMul"}
# Producers of features: normalisation (an encoder's last LayerNorm, an L2-normalised
# embedding: x / ||x||), pooling over tokens (ReduceMean, or sum / count), BERT's Tanh pooler.
_FEATURE_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                "SkipSimplifiedLayerNormalization", "RMSNormalization", "LpNormalization", "ReduceMean",
                "ReduceSum", "ReduceL2", "Div", "Tanh"}


def feature_outputs(model: ir.Model) -> frozenset[str]:
    """The graph outputs that are features, not scores: walking back from the output through
    data movement and affine constants (a LayerNorm's gamma and beta, a classifier's bias),
    the first producer normalises or pools (``_FEATURE_OPS``); a Concat of features is
    features (sentence-transformers' pooled embedding). A decomposed softmax (exp over its
    sum) is scores. Anything else keeps the argmax proxy its shape gives it."""
    return frozenset(v.name for v in model.graph.outputs if v.name and _output_kind(v) == "features")


def _output_kind(value: ir.Value) -> str:
    for _ in range(32):
        node = value.producer() if value is not None else None
        if node is None:
            return "unknown"
        op = node.op_type
        varying = [v for v in node.inputs if v is not None and v.const_value is None
                   and not _produced_by(v, "Constant")]
        if op in _SCORE_OPS or (op == "Div" and _produced_by(node.inputs[0], "Exp")):
            return "scores"
        if op == "Div" and varying == [node.inputs[0]]:  # by a constant (a temperature): affine
            value = varying[0]
            continue
        if op in _FEATURE_OPS:
            return "features"
        if op in _PASS_THROUGH and node.inputs:
            value = node.inputs[0]
            continue
        if op == "Concat" and varying:  # one kind when every part is of it (a pooled embedding)
            kinds = {_output_kind(v) for v in varying}
            return kinds.pop() if len(kinds) == 1 else "unknown"
        if op in ("Add", "Sub", "Mul") and len(varying) == 1:
            value = varying[0]
            continue
        return "unknown"
    return "unknown"


def _produced_by(value: ir.Value | None, op: str) -> bool:
    node = value.producer() if value is not None else None
    return node is not None and node.op_type == op


def map_shaped(shape: tuple[int, ...]) -> bool:
    """One score per pixel: [N, 1, H, W] or [N, H, W] (not [N, T, V] scores, see above)."""
    if proxy_applies(shape) or len(shape) not in (3, 4) or (len(shape) == 4 and shape[1] != 1):
        return False
    return int(np.prod(shape[-2:])) >= MAP_MIN_PIXELS


@dataclass
class OutputAccumulator:
    """Sums over batches for one output; memory is O(channels), not O(samples)."""

    name: str
    signal: float = 0.0
    noise: float = 0.0
    channel_signal: np.ndarray | None = None
    channel_noise: np.ndarray | None = None
    channel_count: int = 0
    agree: int = 0
    positions: int = 0
    proxy: bool = False
    finite: bool = True
    map_inter: int = 0
    map_union: int = 0
    choices: list = field(default_factory=list)  # [N, T, V] scores: (float, candidate) argmax per batch
    batches: int = 0
    shape_moved: int = 0  # batches where the candidate's output shape differs from float's
    is_map: bool | None = None  # None: not decided; False once a value leaves [0, 1]
    features: bool = False  # the graph says this output is features (feature_outputs): no argmax

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        r = np.asarray(reference, np.float64)
        c = np.asarray(candidate, np.float64)
        self.batches += 1
        if r.shape != c.shape:
            if r.ndim != c.ndim:
                raise ValueError(f"output {self.name}: shapes differ {r.shape} vs {c.shape}")
            # A length the model decides (a TTS model's audio, from its predicted durations):
            # the common part is compared, and the batches whose shape moved are counted.
            self.shape_moved += 1
            r, c = common_part(r, c)
        if not np.isfinite(c).all():
            self.finite = False
            c = np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)
        diff = r - c
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(diff * diff))
        axis = channel_axis(r.shape)
        if axis is not None:
            others = tuple(a for a in range(r.ndim) if a != axis)
            sig = np.sum(r * r, axis=others)
            noi = np.sum(diff * diff, axis=others)
            if self.channel_signal is None or self.channel_signal.shape != sig.shape:
                self.channel_signal, self.channel_noise = sig, noi
            else:
                self.channel_signal = self.channel_signal + sig
                self.channel_noise = self.channel_noise + noi
            self.channel_count += r.size // r.shape[axis]
        if not self.features and proxy_applies(r.shape):
            self.proxy = True
            a, b = np.argmax(r, axis=-1), np.argmax(c, axis=-1)
            if r.ndim == 3:  # decided in result(), once the background class is known
                self.choices.append((a.ravel().astype(np.int32), b.ravel().astype(np.int32)))
            else:
                self.agree += int(np.sum(a == b))
                self.positions += a.size
        elif self.is_map is not False and map_shaped(r.shape):
            self.is_map = bool(r.min() >= 0.0 and r.max() <= 1.0)
            a, b = r > MAP_THRESHOLD, c > MAP_THRESHOLD
            self.map_inter += int(np.sum(a & b))
            self.map_union += int(np.sum(a | b))

    def sequence_agreement(self) -> None:
        """Agreement over [N, T, V] positions, leaving out those where float and candidate
        both pick the background class (see the module docstring)."""
        if not self.choices:
            return
        a = np.concatenate([x for x, _ in self.choices])
        b = np.concatenate([y for _, y in self.choices])
        classes, counts = np.unique(a, return_counts=True)
        informative = np.ones(a.shape, bool)
        if counts.max() > BACKGROUND_SHARE * a.size:
            background = classes[counts.argmax()]
            informative = (a != background) | (b != background)
        self.agree += int(np.sum((a == b) & informative))
        self.positions += int(np.sum(informative))
        self.choices = []

    def result(self) -> OutputFidelity:
        self.sequence_agreement()
        sqnr = sqnr_from_sums(self.signal, self.noise)
        segments = self.segments()
        worst = min((s["sqnr_db"] for s in segments), default=sqnr)
        agreement = self.agree / self.positions if self.proxy and self.positions else None
        positions, proxy = self.positions, "argmax"
        if self.is_map and self.map_union:
            agreement, positions, proxy = self.map_inter / self.map_union, self.map_union, "mask IoU"
        if not self.finite:
            sqnr, worst = -math.inf, -math.inf
        shape_kept = 1.0 - self.shape_moved / self.batches if self.batches else 1.0
        return OutputFidelity(self.name, sqnr, worst, agreement, positions, segments, proxy, shape_kept)

    def segments(self) -> list[dict]:
        """Channels grouped by magnitude, each group with its SQNR (dB).

        Sorted by RMS, the channels split wherever one is ``SEGMENT_GAP`` times the next:
        box coordinates in pixels and class probabilities concatenated into one tensor fall
        apart; the logits of a classifier, spread continuously, stay one group.
        """
        if self.channel_signal is None or self.channel_count == 0:
            return []
        rms = np.sqrt(self.channel_signal / self.channel_count)
        top = float(rms.max())
        if top == 0.0:
            return []
        level = np.log10(np.maximum(rms, top * SEGMENT_FLOOR))
        order = np.argsort(-level)
        cuts = np.nonzero(-np.diff(level[order]) >= np.log10(SEGMENT_GAP))[0] + 1
        out = []
        for members in np.split(order, cuts):
            sig = float(self.channel_signal[members].sum())
            out.append({
                "channels": int(members.size),
                "first": int(members.min()),
                "rms": float(np.sqrt(sig / (self.channel_count * members.size))),
                "sqnr_db": sqnr_from_sums(sig, float(self.channel_noise[members].sum())),
            })
        return out


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB from the sums of r^2 and (r - c)^2; +inf when the
    noise is 0, -inf when the signal is 0 or the noise infinite."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or math.isinf(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class OutputFidelity:
    name: str
    sqnr_db: float
    segment_sqnr_db: float
    agreement: float | None
    positions: int
    segments: list[dict] = field(default_factory=list)
    proxy: str = "argmax"  # what ``agreement`` is: "argmax", or "mask IoU" for a probability map
    shape_kept: float = 1.0  # share of batches whose output shape is float's (a decided length)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "sqnr_db": _round(self.sqnr_db),
            "segment_sqnr_db": _round(self.segment_sqnr_db),
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "positions": self.positions,
            "proxy": self.proxy if self.agreement is not None else None,
            "shape_kept": round(self.shape_kept, 4),
            "segments": [{**s, "sqnr_db": _round(s["sqnr_db"]), "rms": float(f"{s['rms']:.4g}")}
                         for s in self.segments],
        }


def _round(x: float) -> float | str:
    return round(x, 2) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def compare_outputs(references: list[dict[str, np.ndarray]], candidates: list[dict[str, np.ndarray]],
                    names: list[str], features: frozenset[str] = frozenset()) -> list[OutputFidelity]:
    """Fidelity of each float output in ``names`` over paired per-batch output dicts;
    ``features`` (``feature_outputs``) are judged without the argmax proxy."""
    accs = {n: OutputAccumulator(n, features=n in features) for n in names}
    for ref, cand in zip(references, candidates):
        for n in names:
            accs[n].add(ref[n], cand[n])
    return [accs[n].result() for n in names]
