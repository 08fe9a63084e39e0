"""Load a single-file ONNX model without reading its weights: inline weights memory-mapped.

A model without external data holds every weight inside its protobuf. ``onnx.load`` reads
the whole file into memory and the parser copies each weight once more into the message:
two passes over the file and twice its size resident before any work starts (SmolLM2-135M:
653 MB on disk, 2.1 GB peak for a 4-bit conversion). Here the protobuf's wire format is
walked over a memory map instead, down to the main graph's initializers only; their
``raw_data`` bytes are cut out of the message handed to the parser, and each such weight
becomes a tensor viewing its bytes in the mapped file. A command then reads only the
weights it touches, each once, straight from the page cache.

Only plain tensors are mapped: those made of dims, data type, name and raw data (what
exporters write), of a numpy-native type, whose byte count matches their shape. Anything
else (other fields, typed-data tensors, subgraph initializers, sparse tensors) is parsed as
usual, so re-serialising a loaded model gives the same bytes either way. A file the walk
does not understand is left to ``onnx.load`` (None is returned), which reports the error.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

# Below this size a file is parsed as usual: mapping saves nothing worth a second code path.
MIN_FILE_BYTES = 1 << 20
# Smaller tensors stay in the parsed message (a mapping per tensor costs a system call).
MIN_TENSOR_BYTES = 1024
_TEXT_SUFFIXES = {".json", ".onnxjson", ".txt", ".textproto", ".onnxtxt", ".pbtxt", ".prototxt"}
_NUMPY_TYPES = {
    ir.DataType.FLOAT: np.float32, ir.DataType.UINT8: np.uint8, ir.DataType.INT8: np.int8,
    ir.DataType.UINT16: np.uint16, ir.DataType.INT16: np.int16, ir.DataType.INT32: np.int32,
    ir.DataType.INT64: np.int64, ir.DataType.BOOL: np.bool_, ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64, ir.DataType.UINT32: np.uint32, ir.DataType.UINT64: np.uint64,
}
# ModelProto.graph, GraphProto.initializer, TensorProto's dims/data_type/name/raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _NAME, _RAW_DATA = 1, 2, 8, 9
_LEN, _VARINT = 2, 0


class _WireError(ValueError):
    """The bytes are not the protobuf this walk expects: parse the file as usual."""


class MappedTensor(ir.Tensor):
    """A weight whose bytes stay in the memory-mapped model file until they are used.

    Protobuf places raw data at any byte offset, so a view may be misaligned for its type;
    ``numpy()`` then returns an aligned copy (C kernels and onnxruntime may assume alignment).
    """

    __slots__ = ("_map",)

    def __init__(self, array: np.ndarray, dtype: ir.DataType, *, name: str, source: mmap.mmap) -> None:
        super().__init__(array, dtype, name=name)
        self._map = source

    def release(self) -> None:
        """Drop the pages read so far from this process (a pass is done with the weight);
        the mapping stays valid: a later read faults them in again from the page cache."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def numpy(self) -> np.ndarray:
        array = self.raw
        return array if array.flags.aligned else array.copy()

    def __array__(self, dtype=None) -> np.ndarray:  # noqa: ANN001 - numpy's protocol
        return self.numpy().__array__(dtype)


def load_mapped(path: str | os.PathLike) -> ir.Model | None:
    """``path`` loaded with its inline weights memory-mapped, or None when this does not
    apply (a small file, a text format, or bytes the walk does not understand)."""
    with open(path, "rb") as f:
        stripped = _stripped(f, path)
        if stripped is None:
            return None
        proto, found = stripped
        model = ir.serde.deserialize_model(proto)
        del proto
        ir.external_data.set_base_dir(model.graph, os.path.dirname(path))
        _attach(model, f.fileno(), found)
    return model


def skeleton(path: str | os.PathLike):  # noqa: ANN201 - onnx.ModelProto | None
    """``path``'s ModelProto without the raw data of its main graph's plain initializers
    (their dims, types and names stay), or None where :func:`load_mapped` does not apply.
    For questions about a large file's structure (which external data files it names)."""
    with open(path, "rb") as f:
        stripped = _stripped(f, path)
    return None if stripped is None else stripped[0]


def _stripped(f, path: str | os.PathLike):  # noqa: ANN001, ANN202 - (ModelProto, found) | None
    if Path(path).suffix.lower() in _TEXT_SUFFIXES or os.fstat(f.fileno()).st_size < MIN_FILE_BYTES:
        return None
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = memoryview(buf)
        try:
            stripped, found = _strip_model(view)
        except _WireError:
            return None
        finally:
            view.release()
    finally:
        buf.close()
    if not found:
        return None
    import onnx

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(bytes(stripped))
    except Exception:  # noqa: BLE001 - the usual loader reports the parse error
        return None
    return proto, found


def _attach(model: ir.Model, fd: int, found: dict[str, tuple[ir.DataType, tuple[int, ...], int, int]]) -> None:
    """Give each stripped initializer its mapped bytes (one mapping per tensor, so a weight
    a pass drops is unmapped with it)."""
    page = mmap.ALLOCATIONGRANULARITY
    for name, (dtype, dims, offset, length) in found.items():
        value = model.graph.initializers.get(name)
        if value is None:
            raise _WireError(name)  # pragma: no cover - every stripped tensor is an initializer
        start = offset - offset % page
        view = mmap.mmap(fd, offset + length - start, access=mmap.ACCESS_READ, offset=start)
        array = np.frombuffer(view, dtype=_NUMPY_TYPES[dtype], count=length // np.dtype(_NUMPY_TYPES[dtype]).itemsize,
                              offset=offset - start).reshape(dims)
        value.const_value = MappedTensor(array, dtype, name=name, source=view)


# ---- the wire format: varints and length-delimited fields only ----------------------------


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise _WireError("bad varint")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int):  # noqa: ANN202 - Iterator of tuples
    """(field number, wire type, value start, value end or varint value, field start)."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos, first
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _WireError("field overruns its message")
            yield field, wire, pos, pos + size, first
            pos += size
        elif wire in (1, 5):  # fixed 64 / 32 bits
            pos += 8 if wire == 1 else 4
            yield field, wire, None, pos, first
        else:  # groups: not used by ONNX
            raise _WireError("unexpected wire type")
    if pos != end:
        raise _WireError("message overruns its length")


def _strip_model(buf: memoryview) -> tuple[bytearray, dict]:
    out = bytearray()
    found: dict = {}
    seen_graph = False
    for field, wire, start, end, first in _fields(buf, 0, len(buf)):
        if field == _MODEL_GRAPH and wire == _LEN:
            if seen_graph:
                raise _WireError("two graphs")  # protobuf would merge them: leave it to onnx
            seen_graph = True
            graph = _strip_graph(buf, start, end, found)
            out += _encode_varint(_MODEL_GRAPH << 3 | _LEN) + _encode_varint(len(graph)) + graph
        else:
            out += buf[first:end]
    return out, found


def _strip_graph(buf: memoryview, start: int, end: int, found: dict) -> bytearray:
    out = bytearray()
    for field, wire, vstart, vend, first in _fields(buf, start, end):
        if field == _GRAPH_INITIALIZER and wire == _LEN and vend - vstart >= MIN_TENSOR_BYTES:
            entry = _plain_tensor(buf, vstart, vend)
            if entry is not None and entry[0] not in found:
                name, dtype, dims, offset, length, kept = entry
                found[name] = (dtype, dims, offset, length)
                out += _encode_varint(_GRAPH_INITIALIZER << 3 | _LEN) + _encode_varint(len(kept)) + kept
                continue
        out += buf[first:vend]
    return out


def _plain_tensor(buf: memoryview, start: int, end: int):  # noqa: ANN202 - tuple | None
    """(name, dtype, dims, raw offset, raw length, the message without raw_data) for a
    plain tensor (module doc), else None."""
    dims: list[int] = []
    name = dtype = raw = None
    kept = bytearray()
    for field, wire, vstart, vend, first in _fields(buf, start, end):
        if field == _DIMS and wire == _VARINT:
            dims.append(vstart)
        elif field == _DIMS and wire == _LEN:
            pos = vstart
            while pos < vend:
                dim, pos = _varint(buf, pos, vend)
                dims.append(dim)
        elif field == _DATA_TYPE and wire == _VARINT and dtype is None:
            dtype = vstart
        elif field == _NAME and wire == _LEN and name is None:
            try:
                name = bytes(buf[vstart:vend]).decode("utf-8")
            except UnicodeDecodeError:
                return None
        elif field == _RAW_DATA and wire == _LEN and raw is None:
            raw = (vstart, vend - vstart)
            continue
        else:
            return None
        kept += buf[first:vend]
    if name is None or raw is None or dtype is None or any(d >= 1 << 62 for d in dims):
        return None
    try:
        dtype = ir.DataType(dtype)
    except ValueError:
        return None
    if dtype not in _NUMPY_TYPES or raw[1] < MIN_TENSOR_BYTES:
        return None
    if int(np.prod(dims, dtype=np.int64)) * np.dtype(_NUMPY_TYPES[dtype]).itemsize != raw[1]:
        return None
    return name, dtype, tuple(dims), raw[0], raw[1], kept
