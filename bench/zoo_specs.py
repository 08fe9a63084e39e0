"""Benchmark zoo registry: one Spec per model (its exporter and metric), evaluate() and
readiness."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoo_data import MODELS, ZooError, data_ready, model_path
from zoo_export import (
    prepare_decoder_0p6b,
    prepare_efficientnet_lite0,
    prepare_minilm,
    prepare_mnist_cnn,
    prepare_ppocr_rec,
    prepare_resnet18_synth,
    prepare_smollm2,
)
from zoo_metrics import (
    eval_accuracy,
    eval_fidelity,
    eval_lee,
    eval_ocr,
    eval_perplexity,
    eval_topk,
    session,
)

# --------------------------------------------------------------------------------------
# registry, prepare driver, report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    prepare: Callable[[str], None]
    evaluate: Callable[[str, object, str], dict]
    metric: str  # the headline key of evaluate()'s dict
    real: bool
    needs_bench_venv: bool  # torch / transformers / rapidocr / tokenizers
    about: str
    sequence: bool = False  # axis 1 of every input is the sequence: also time S=1


SPECS = {s.name: s for s in [
    Spec("efficientnet_lite0", prepare_efficientnet_lite0, eval_topk, "top1", True, True,
         "EfficientNet-Lite0 ImageNet-1k (PyTorch -> ONNX opset 17)"),
    Spec("ppocr_rec", prepare_ppocr_rec, eval_ocr, "cer", True, True,
         "PP-OCRv4 text recognition (RapidOCR's ONNX)"),
    Spec("minilm", prepare_minilm, eval_lee, "pearson", True, True,
         "paraphrase-MiniLM-L3-v2 sentence embedder (ONNX)"),
    Spec("smollm2", prepare_smollm2, eval_perplexity, "perplexity", True, True,
         "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised -> ONNX fp32, no KV cache)",
         sequence=True),
    Spec("mnist_cnn", prepare_mnist_cnn, eval_accuracy, "accuracy", True, True,
         "ccexam MNIST CNN (PyTorch -> ONNX opset 17)"),
    Spec("resnet18_synth", prepare_resnet18_synth, eval_fidelity, "rel_l2", False, False,
         "ResNet-18-shaped CNN, random He weights (onnx.helper)"),
    Spec("decoder_0p6b", prepare_decoder_0p6b, eval_fidelity, "rel_l2", False, False,
         "24-layer MatMul decoder stack, 0.57 B params, external data (onnx.helper)",
         sequence=True),
]}
NAMES = list(SPECS)


def spec_of(name: str) -> Spec:
    if name not in SPECS:
        raise ZooError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    return SPECS[name]


def is_ready(name: str) -> bool:
    """Model file, its data splits (and for smollm2 the tokenizer) are all in place."""
    extra = [MODELS / f"{name}_tokenizer"] if name == "smollm2" else []
    return model_path(name).exists() and data_ready(name) and all(p.exists() for p in extra)



def evaluate(name: str, onnx_path: str | Path | None = None, split: str = "eval") -> dict:
    """Run `onnx_path` (default: the fp32 model) on a split and return the model's metric."""
    spec = spec_of(name)
    path = Path(onnx_path) if onnx_path is not None else model_path(name)
    if not path.exists():
        raise ZooError(f"model file {path} not found; run: python bench/zoo.py prepare --only {name}")
    return spec.evaluate(name, session(path), split)
