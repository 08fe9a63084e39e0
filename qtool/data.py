"""Dataset folders -> a stream of feeds ``{input_name: ndarray}``, never loaded whole.

A folder holds one sample per file, in natural file-name order (runs of digits compare as
numbers, so ``test_data_set_2`` comes before ``test_data_set_10`` and ``img9.png`` before
``img10.png``; labels files list labels in this order):

- ``*.npy``: one array, for single-input models;
- ``*.npz``: one array per model input, keyed by the input's name;
- ``test_data_set_*/input_*.pb``: the ONNX test-data layout (one folder per sample);
- ``*.png`` / ``*.jpg`` / ``*.jpeg`` / ``*.bmp``: images, made into tensors by the recipe's
  ``[preprocess]`` section (resize, crop, scale, mean/std, layout);
- optional labels: ``labels.txt`` (one per line), ``labels.json`` (a list, or a map from file
  name to label) or ``labels.npy``, in the samples' order.

A sample array may carry the model's batch dimension or not (rank one less): it is added.
Every sample is checked against the model's inputs (names, dtypes, ranks, fixed dimensions)
and a mismatch names the file, the input, and what was expected.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtool.config import PreprocessConfig
from qtool.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_FILES = ("labels.txt", "labels.json", "labels.npy")

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and shape with ``None`` for dynamic dimensions."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join(
            "?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name} {self.dtype.name}{dims}"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's run-time inputs as InputSpecs (initializers excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.dtype is None:
            raise DataError(f"model input {value.name!r} has no element type", "re-export the model")
        shape = None
        if value.shape is not None:
            # Exporters write an unknown dimension as a name, as nothing, or as a literal -1
            # (PaddlePaddle, TF converters): all three mean "any size".
            shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    return specs


@dataclass(frozen=True)
class Sample:
    path: Path
    kind: str  # npy | npz | pb | image


class Dataset:
    """A folder of samples matched to a model's inputs. Iterate with ``batches()``."""

    def __init__(
        self,
        folder: str | os.PathLike,
        inputs: Sequence[InputSpec],
        preprocess: PreprocessConfig | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.inputs = list(inputs)
        self.preprocess = preprocess or PreprocessConfig()
        if not self.folder.exists():
            raise DataError(f"dataset folder not found: {self.folder}", "check the --data path")
        if not self.folder.is_dir():
            raise DataError(
                f"--data must be a folder of samples, got a file: {self.folder}",
                "put the .npy/.npz/image files in a folder and pass the folder",
            )
        self.samples = _scan(self.folder)
        if not self.samples:
            raise DataError(
                f"dataset folder {self.folder} holds no samples",
                "add *.npy, *.npz, images, or test_data_set_*/input_*.pb (see `qtool --help`)",
            )
        kinds = {s.kind for s in self.samples}
        if len(kinds) > 1:
            raise DataError(
                f"dataset folder {self.folder} mixes sample kinds ({', '.join(sorted(kinds))})",
                "keep one kind of sample file per folder",
            )
        self.kind = kinds.pop()
        if self.kind in ("npy", "image") and len(self.inputs) != 1:
            names = ", ".join(s.name for s in self.inputs)
            raise DataError(
                f"{self.kind} samples feed one input, but the model has {len(self.inputs)} ({names})",
                "store each sample as .npz with one array per input name",
            )

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices) -> Dataset:  # noqa: ANN001 - an iterable of sample positions
        """The same folder restricted to the samples at ``indices`` (in that order)."""
        clone = copy.copy(self)
        clone.samples = [self.samples[i] for i in indices]
        return clone

    def load_sample(self, index: int) -> Feed:
        """One sample as a feed, validated, with the batch dimension present."""
        sample = self.samples[index]
        raw = self._read(sample)
        feed = {}
        for spec in self.inputs:
            if spec.name not in raw:
                found = ", ".join(sorted(raw)) or "nothing"
                raise DataError(
                    f"{sample.path.name}: no array for model input {spec.name!r} (found {found})",
                    f"the model's inputs are {', '.join(s.describe() for s in self.inputs)}",
                )
            feed[spec.name] = _fit(raw[spec.name], spec, sample.path)
        extra = sorted(set(raw) - {s.name for s in self.inputs})
        if extra:
            raise DataError(
                f"{sample.path.name}: arrays {', '.join(map(repr, extra))} match no model input",
                f"the model's inputs are {', '.join(s.describe() for s in self.inputs)}",
            )
        return feed

    def batches(
        self,
        batch_size: int = 1,
        *,
        limit: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[list[int], Feed]]:
        """Yield (sample indices, feed) batches, reading one batch of files at a time.

        ``limit`` caps the samples used (0: all); ``shard=(i, n)`` keeps every n-th batch
        starting at batch i, so n shards together see exactly the batches of one run.
        Samples whose shapes differ (dynamic dimensions) are never stacked together: a
        batch ends early where the shape changes.
        """
        index, n_shards = shard
        if not 0 <= index < n_shards:
            raise DataError(f"shard {index}/{n_shards} is out of range", "use I/N with 0 <= I < N")
        if batch_size > 1 and any(not s.batch_dynamic for s in self.inputs if s.shape):
            batch_size = 1  # a fixed batch dimension of the model: feed samples one by one
        count = len(self) if limit <= 0 else min(limit, len(self))
        # Batches are fixed groups of positions, so a shard knows its batches without
        # reading anyone else's files.
        for group_no, start in enumerate(range(0, count, batch_size)):
            if group_no % n_shards != index:
                continue
            pending: list[tuple[int, Feed]] = []
            for i in range(start, min(start + batch_size, count)):
                feed = self.load_sample(i)
                if pending and _shapes(pending[0][1]) != _shapes(feed):
                    yield _stack(pending)
                    pending = []
                pending.append((i, feed))
            if pending:
                yield _stack(pending)

    def labels(self) -> np.ndarray | None:
        """Labels in sample order from labels.txt/.json/.npy, or None when there are none."""
        return load_labels(self.folder, [s.path for s in self.samples])

    # -- readers -----------------------------------------------------------------------

    def _read(self, sample: Sample) -> Feed:
        try:
            if sample.kind == "npy":
                return {self.inputs[0].name: np.load(sample.path, allow_pickle=False)}
            if sample.kind == "npz":
                with np.load(sample.path, allow_pickle=False) as archive:
                    return {key: archive[key] for key in archive.files}
            if sample.kind == "pb":
                return _read_pb_folder(sample.path, self.inputs)
            return {self.inputs[0].name: _read_image(sample.path, self.preprocess, self.inputs[0])}
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"cannot read sample {sample.path}: {str(exc).splitlines()[0][:160]}",
                "the file is corrupt or not in the format its name says",
            ) from None


def _stack(pending: list[tuple[int, Feed]]) -> tuple[list[int], Feed]:
    ids = [i for i, _ in pending]
    if len(pending) == 1:
        return ids, pending[0][1]
    return ids, {name: np.concatenate([f[name] for _, f in pending]) for name in pending[0][1]}


def _shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    return {k: v.shape[1:] for k, v in feed.items()}


def natural_key(name: str) -> tuple:
    """Sort key that compares runs of digits as numbers: ``a2`` < ``a10``.

    Exporters number samples without zero padding (the ONNX test-data layout writes
    ``test_data_set_0`` ... ``test_data_set_10``), and plain string order would put ``_10``
    before ``_2`` and silently pair each sample with another sample's label. Ties between
    spellings of the same number (``a01`` and ``a1``) fall back to the plain name, so the
    order is total and does not depend on the file system's listing.
    """
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p), name


def _scan(folder: Path) -> list[Sample]:
    samples = []
    for entry in sorted(folder.iterdir(), key=lambda e: natural_key(e.name)):
        name = entry.name
        if name.startswith(".") or name in LABEL_FILES:
            continue
        if entry.is_dir() and name.startswith("test_data_set_"):
            samples.append(Sample(entry, "pb"))
        elif entry.suffix == ".npy":
            samples.append(Sample(entry, "npy"))
        elif entry.suffix == ".npz":
            samples.append(Sample(entry, "npz"))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            samples.append(Sample(entry, "image"))
    return samples


def _fit(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Check ``array`` against ``spec``; add the batch axis if the sample lacks it."""
    if array.dtype != spec.dtype:
        safe = np.can_cast(array.dtype, spec.dtype, casting="same_kind") and (
            array.dtype.kind == spec.dtype.kind
        )
        if not safe:
            raise DataError(
                f"{path.name}: input {spec.name!r} has dtype {array.dtype}, the model wants {spec.dtype}",
                f"save the sample as {spec.dtype} (e.g. arr.astype(np.{spec.dtype.name}))",
            )
        array = array.astype(spec.dtype)
    if spec.shape is None:
        return array
    rank = len(spec.shape)
    if array.ndim == rank - 1:
        array = array[np.newaxis]
    if array.ndim != rank:
        raise DataError(
            f"{path.name}: input {spec.name!r} has shape {list(array.shape)}, "
            f"the model wants {spec.describe().split(' ', 1)[1]}",
            "store one sample per file with the model's input shape (batch dimension optional)",
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if want is not None and want != got:
            raise DataError(
                f"{path.name}: input {spec.name!r} has shape {list(array.shape)}, the model wants "
                f"{spec.describe().split(' ', 1)[1]} (dimension {axis} must be {want})",
                "resize or re-export the samples to the model's input shape",
            )
    return np.ascontiguousarray(array)


def _read_pb_folder(folder: Path, inputs: Sequence[InputSpec]) -> Feed:
    from onnx import TensorProto, numpy_helper

    files = sorted(folder.glob("input_*.pb"), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"{folder} holds no input_*.pb files", "use the ONNX test-data layout")
    feed = {}
    for position, file in enumerate(files):
        tensor = TensorProto()
        tensor.ParseFromString(file.read_bytes())
        name = tensor.name
        if not name:
            if position >= len(inputs):
                raise DataError(f"{file}: more input files than model inputs", "")
            name = inputs[position].name
        feed[name] = numpy_helper.to_array(tensor)
    return feed


def _read_image(path: Path, pre: PreprocessConfig, spec: InputSpec) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if pre.color == "L" else "RGB")
        if pre.size:
            height, width = pre.size
            image = image.resize((width, height), Image.BILINEAR)
        else:
            if pre.resize:
                w, h = image.size
                ratio = pre.resize / min(w, h)
                image = image.resize((round(w * ratio), round(h * ratio)), Image.BILINEAR)
            if pre.crop:
                w, h = image.size
                left, top = (w - pre.crop) // 2, (h - pre.crop) // 2
                image = image.crop((left, top, left + pre.crop, top + pre.crop))
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pre.color == "BGR":
        pixels = pixels[:, :, ::-1]
    channels = pixels.shape[2]
    mean = np.asarray(pre.mean[:channels], dtype=np.float32)
    std = np.asarray(pre.std[:channels], dtype=np.float32)
    pixels = (pixels * np.float32(pre.scale) - mean) / std
    if pre.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[np.newaxis].astype(pre.dtype))


def load_labels(folder: Path, sample_paths: Sequence[Path] | None = None) -> np.ndarray | None:
    """Labels from ``folder`` (labels.txt / labels.json / labels.npy), or None if absent."""
    folder = Path(folder)
    for name in LABEL_FILES:
        path = folder / name
        if path.exists():
            return read_labels_file(path, sample_paths)
    return None


def read_labels_file(path: Path, sample_paths: Sequence[Path] | None = None) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"labels file not found: {path}", "check the --labels path")
    try:
        if path.suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                if sample_paths is None:
                    raise DataError(f"{path}: a name->label map needs the sample list", "")
                missing = [p.name for p in sample_paths if p.name not in data]
                if missing:
                    raise DataError(
                        f"{path} has no label for {missing[0]}"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                        "give every sample file a label",
                    )
                data = [data[p.name] for p in sample_paths]
            labels = np.asarray(data)
        else:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            labels = np.asarray([int(ln) if ln.lstrip("-").isdigit() else ln for ln in lines])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read labels from {path}: {exc}", "one label per line, in sample order") from None
    if sample_paths is not None and len(labels) != len(sample_paths):
        raise DataError(
            f"{path.name} has {len(labels)} labels for {len(sample_paths)} samples",
            "give exactly one label per sample, in natural file-name order (sample_2 before sample_10)",
        )
    return labels
