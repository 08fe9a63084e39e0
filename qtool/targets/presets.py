"""The conversion targets: each a preset of the QDQ conventions its runtime fuses.

A preset has two halves. ``quantize`` holds recipe values (``[quantize]`` keys) that the
preset fixes; a flag or recipe key that contradicts one is an error, not silently dropped.
``placement`` holds what the recipe cannot say: where Q/DQ pairs go and how activations
are typed, read by the static QDQ pass (``qtool.passes.qdq``).

The rules, and where each comes from:

cpu-vnni (onnxruntime CPU provider, x86 with AVX-512 VNNI / AVX-VNNI / AMX): today's
  default. uint8 asymmetric activations x int8 symmetric per-channel weights, Q/DQ on
  every quantized op's inputs and output so onnxruntime's QDQ fusion forms QLinearConv /
  QGemm node units (onnxruntime docs, "Quantize ONNX models": "QDQ ... U8S8 is the default
  on x86-64"; measured here: int8 activations 104 ms vs uint8 37-40 ms on a ResNet-18-shaped
  CNN, qtool.pipeline.plan.SLOW_INT8_ACTIVATIONS).
cpu-avx2 (x86 without VNNI): as cpu-vnni but 7-bit weights (reduce-range). Without VNNI,
  MLAS's u8 x s8 kernels use VPMADDUBSW, which adds two u8*s8 products into a saturating
  int16 (onnxruntime docs, "Quantize ONNX models", section "When and why do I need to try
  U8U8?": "it can happen that the output does not fit into a 16-bit integer and has to be
  clamped (saturated) ... try reduce_range"; issues microsoft/onnxruntime#5849, #14642).
  With |w| <= 63: 2 * 255 * 63 = 32130 <= 32767, so the pair sum can never saturate.
  s8 x s8 is not the fix on this path: int8 activations are not fused into the fast x86
  kernels at all (measured above), so they trade saturation for a 2.6x slowdown.
openvino (OpenVINO CPU plugin, low-precision transformations): Q/DQ only on the inputs of
  the ops LPT runs in int8 — Conv, ConvTranspose, MatMul, Gemm and element-wise Add/Mul
  of two activations — and never on an op's output: "in order to be able to execute a
  particular DL operation in low-precision all its inputs should be quantized" (OpenVINO
  docs, "Representation of low-precision models", docs.openvino.ai/2021.4/
  pot_docs_ModelRepresentation.html); a FakeQuantize anywhere else is executed as float
  quantize-dequantize work ("Quantized models compute and restrictions",
  docs.openvino.ai/2024/.../quantized-models.html). Activations symmetric (zero point 0):
  unsigned int8 for a non-negative range, signed otherwise; weights int8 symmetric per
  output channel; bias stays float (LPT folds the Add after the Conv); embedding tables
  (Gather of a constant) stored int8 per row, rescaled after the lookup (4x smaller, the
  lookup itself is memory-bound). x * f(x) activations (SiLU, GELU, hard-swish) get no
  Q/DQ between their halves: NNCF leaves them float too (checked on a YOLOX detector and
  PP-OCR; qtool.targets.patterns), and neither do the two small Convs of a
  squeeze-excitation block (pool -> Conv -> act -> Conv -> sigmoid -> Mul with the pooled
  tensor): NNCF's SE_BLOCK ignored pattern (nncf/onnx/quantization/ignored_patterns.py,
  create_se_block) leaves them float, weights included. Average pools get a Q on their input too (NNCF's CPU
  config quantizes AVG_POOL). Each Q then moves up through data movement (Reshape,
  Transpose, Slice, Split, MaxPool, nearest Resize...) to the op producing the tensor, and
  a Concat's inputs share one scale, after NNCF's quantizer propagation and "unified
  scales" (qtool.targets.propagate): OpenVINO then fuses every Q into the Conv/MatMul
  before it and runs the data movement in int8, where a Q after a Transpose or Concat ran
  as an f32 FakeQuantize after an f32 Transpose/Concat. Measured here
  against nncf.quantize's placement (bench/targets.py).
qnn (onnxruntime QNN EP, Qualcomm HTP): QDQ node units on every op (the HTP backend runs
  only quantized ops; a float op falls back to the CPU EP), uint8 asymmetric activations,
  int8 symmetric weights, per-channel only for Conv (axis 0) and ConvTranspose (axis 1),
  MatMul per-tensor ("QNN does not support per-channel MatMul"), int32 bias (onnxruntime
  quantization/execution_providers/qnn/quant_config.py, get_qnn_qdq_config; onnxruntime
  docs, "QNN Execution Provider"). Checked by qtool.targets.validate.check_qnn.
tensorrt (TensorRT explicit quantization): symmetric signed int8 only ("the quantization
  scheme is symmetric uniform quantization - quantized values are represented in signed
  INT8", TensorRT developer guide, "Working with Quantized Types"), weights per output
  channel, Q/DQ on the inputs of weighted ops and both inputs of a residual Add, not on
  outputs ("Q/DQ layer placement recommendations": quantize all inputs of weighted
  operations; TensorRT fuses the rest), opset >= 13 (per-axis QuantizeLinear).
  Checked by qtool.targets.validate.check_tensorrt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# onnxruntime fuses DQ inputs into these ops without an output Q (a float result): a model
# output they produce stays float on every target, and other outputs per ``float_output_ops``.
FLOAT_OUTPUT_OPS = frozenset({"Gemm", "MatMul"})


@dataclass(frozen=True)
class Placement:
    """Where Q/DQ pairs go and how tensors are typed, beyond what a recipe says.

    ``outputs``: quantize each quantized op's output (onnxruntime node units) or only the
    inputs of the ops that run in int8 (OpenVINO LPT, TensorRT). ``activation_sign``:
    "recipe" (the recipe's activation_type), "by-range" (symmetric; uint8 for a range
    >= 0, int8 otherwise) or "signed" (symmetric int8 always). ``int32_bias``: bias as
    int32 with ``s_b = s_x * s_w``. ``elementwise_constants``: Add/Mul/Concat with a constant
    operand get Q/DQ (their constant too); False: only Add/Mul of two activations.
    ``weight_qmax``: largest |q| of a symmetric weight (127; 63 for 7-bit reduce-range).
    ``per_channel_ops``: op types whose weights may be per-channel (None: every op that
    has an output-channel axis). ``per_tensor_below_13``: a model below opset 13 (per-axis
    Q/DQ) gets per-tensor weights instead of an error, as qtool's default does.
    ``propagate``: move each Q up through data-movement ops to the op that produces the
    tensor and give a Concat's inputs one scale (qtool.targets.propagate, after NNCF's
    quantizer propagation). ``float_output_ops``: ops the runtime runs on int8 inputs with
    a float result (onnxruntime's CPU provider: DQ -> MatMul becomes MatMulIntegerToFloat,
    DQ -> Gemm a QGemm with float output); their output gets a Q only where a quantized op
    reads it, since a Q that only feeds float ops adds rounding and no int8 kernel.
    ``float_se_blocks``: the two Convs of a squeeze-excitation block stay float
    (qtool.targets.patterns, NNCF's SE_BLOCK ignored pattern).
    """

    outputs: bool = True
    activation_sign: str = "recipe"
    int32_bias: bool = True
    elementwise_constants: bool = True
    weight_qmax: int = 127
    per_channel_ops: frozenset[str] | None = None
    per_tensor_below_13: bool = False  # opset < 13 without upgrade: per-tensor weights
    propagate: bool = False  # move Qs up through data movement, unify Concat scales
    float_output_ops: frozenset[str] = FLOAT_OUTPUT_OPS
    float_se_blocks: bool = False  # SE blocks' Convs stay float (NNCF's SE_BLOCK)


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    quantize: dict = field(default_factory=dict)  # [quantize] values the preset fixes
    placement: Placement = field(default_factory=Placement)
    formats: tuple[str, ...] = ("qdq",)  # int8 formats the runtime accepts
    # allow_opset_upgrade in ``quantize``: the runtime reads opset 13 (per-axis Q/DQ), so the
    # preset raises a model's opset to it instead of falling back to per-tensor weights.
    validator: str | None = None  # name of a check in qtool.targets.validate


# The ops LPT and TensorRT run in int8 when all their inputs are quantized.
INT8_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul")

# Average pools OpenVINO runs on int8 input when it is quantized (NNCF's CPU config,
# nncf/common/hardware/setups/cpu.py, gives AVG_POOL an activation quantization space):
# without a Q before them a global pool runs in f32 and the Conv before it writes f32.
OPENVINO_POOLS = ("AveragePool", "GlobalAveragePool")

_ORT_CPU = {"activation_type": "uint8", "weight_type": "int8", "symmetric_activations": False,
            "per_channel": True}

TARGETS: dict[str, Target] = {
    "cpu-vnni": Target(
        "cpu-vnni", "onnxruntime CPU, x86 with VNNI/AMX: u8 x s8 QDQ node units (today's default)",
        dict(_ORT_CPU), Placement(per_tensor_below_13=True), formats=("qdq", "qoperator")),
    "cpu-avx2": Target(
        "cpu-avx2", "onnxruntime CPU, x86 without VNNI: u8 x 7-bit s8 weights, no int16 saturation",
        dict(_ORT_CPU), Placement(weight_qmax=63, per_tensor_below_13=True), formats=("qdq", "qoperator")),
    "openvino": Target(
        "openvino", "OpenVINO CPU: symmetric Q/DQ on the inputs of the ops LPT runs in int8",
        {"weight_type": "int8", "symmetric_activations": True, "per_channel": True,
         "op_types": (*INT8_COMPUTE_OPS, *OPENVINO_POOLS, "Gather"), "allow_opset_upgrade": True},
        Placement(outputs=False, activation_sign="by-range", int32_bias=False,
                  elementwise_constants=False, propagate=True, float_se_blocks=True)),
    "qnn": Target(
        "qnn", "onnxruntime QNN EP (Qualcomm HTP): u8 QDQ node units, per-channel Conv only",
        {"activation_type": "uint8", "weight_type": "int8", "symmetric_activations": False,
         "per_channel": True},
        # QNN's HTP runs a graph whole in fixed point: every quantized op's output keeps its Q.
        Placement(per_channel_ops=frozenset({"Conv", "ConvTranspose"}), float_output_ops=frozenset()),
        validator="qnn"),
    "tensorrt": Target(
        "tensorrt", "TensorRT explicit quantization: symmetric s8 Q/DQ on weighted-op inputs",
        # activation_bits 8: TensorRT's explicit quantization has no 16-bit Q/DQ (the rule
        # above), so --activation-bits 16 is a usage error rather than a failed validation.
        {"activation_type": "int8", "weight_type": "int8", "symmetric_activations": True,
         "per_channel": True, "op_types": INT8_COMPUTE_OPS, "allow_opset_upgrade": True,
         "activation_bits": 8},
        Placement(outputs=False, activation_sign="signed", int32_bias=False,
                  elementwise_constants=False),
        validator="tensorrt"),
}
# "cpu" is this machine: cpu-vnni or cpu-avx2 by what qtool.hardware finds.
TARGET_NAMES = ("cpu", *TARGETS)
