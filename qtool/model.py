"""Model I/O: load ONNX files (weights stay on disk until used), save atomically, verify.

Loading goes through onnx-ir, so initializers stored as external data are memory-mapped
lazily: reading a graph's structure and tensor metadata never reads the weights. Weights
stored inside a single-file model are memory-mapped too (qtool.mapped): the protobuf is
parsed without them.

Saving never touches the input model: the output is written into a temporary folder beside
its destination, loaded once by onnxruntime as a check, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from qtool import __version__, mapped
from qtool.errors import ModelError, UsageError

# protobuf cannot serialise a message of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2
PROVENANCE_PREFIX = "qtool."


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; weights (external data, or inline in a large file) are
    memory-mapped lazily, never read here."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}", "check the path; qtool reads .onnx files")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a model file", "pass the .onnx file itself")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty", "the file is not an ONNX model; re-export it")
    try:
        model = mapped.load_mapped(path)
        if model is None:
            model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends carry no useful type
        raise ModelError(
            f"{path} is not a readable ONNX model ({_short(exc)})",
            "the file is truncated or not ONNX; re-export or re-download it",
        ) from None
    if len(model.graph.outputs) == 0 or model.ir_version is None:
        raise ModelError(
            f"{path} does not parse as an ONNX model (no graph outputs)",
            "the file is probably not ONNX; check how it was exported",
        )
    _check_external_files(model, path)
    name_unnamed_nodes(model)
    return model


def name_unnamed_nodes(model: ir.Model) -> int:
    """Give every node without a name ``<op_type>_<n>``; return how many were named.

    Node names are optional in ONNX, but recipes' [[layer]] rules, tune's groups and the
    reports all address layers by name. ``n`` counts the unnamed nodes of each op type in
    graph order (subgraphs depth first, as :func:`iter_nodes`), so repeated loads of one file
    give the same names; a name already taken anywhere in the model (subgraphs included)
    is skipped. A model whose nodes all have names is left untouched.
    """
    nodes = list(iter_nodes(model))
    taken = {node.name for node in nodes if node.name}
    counters: dict[str, int] = {}
    named = 0
    for node in nodes:
        if node.name:
            continue
        n = counters.get(node.op_type, 0)
        while f"{node.op_type}_{n}" in taken:
            n += 1
        node.name = f"{node.op_type}_{n}"
        taken.add(node.name)
        counters[node.op_type] = n + 1
        named += 1
    return named


def _check_external_files(model: ir.Model, path: Path) -> None:
    for tensor in iter_initializers(model):
        if isinstance(tensor, ir.ExternalTensor):
            data_file = Path(tensor.base_dir) / tensor.location
            if not data_file.exists():
                raise ModelError(
                    f"external data file missing: {data_file} (needed by tensor {tensor.name!r})",
                    f"keep {tensor.location} next to {path.name}, as it was when the model was saved",
                )
            end = (tensor.offset or 0) + (tensor.length or 0)
            if data_file.stat().st_size < end:
                raise ModelError(
                    f"external data file {data_file} is shorter than tensor {tensor.name!r} needs",
                    "the data file is truncated; copy it again from the original",
                )


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def iter_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph of its If/Loop/Scan nodes, depth first."""
    yield graph
    for node in graph:
        # the attributes' plain dict (a UserDict's .data): most nodes have none, and the
        # Mapping interface costs more than the walk itself (38 walks of a 7.5 K-node decoder
        # per conversion: 0.19 s that way, 0.06 s this way)
        attributes = node.attributes.data
        if not attributes:
            continue
        for attr in attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from iter_graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from iter_graphs(sub)


def iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the model, including those inside subgraphs."""
    for graph in iter_graphs(model.graph):
        yield from graph


def iter_initializers(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in iter_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def initializer_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in iter_initializers(model))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every constant tensor: initializers and Constant nodes, in every graph.

    Exporters often write weights as Constant nodes (inside If branches especially), which
    ``initializer_bytes`` does not see: a model made only of them would "have 0 MB of weights".
    """
    constants = sum(n.attributes["value"].value.nbytes for n in iter_nodes(model)
                    if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in n.attributes)
    return initializer_bytes(model) + constants


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are fed at run time (initializers listed as inputs excluded)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def opset_version(model: ir.Model, domain: str = "") -> int | None:
    return model.opset_imports.get(domain)


def require_opset(model: ir.Model, minimum: int, why: str, allow_upgrade: bool) -> None:
    """Refuse to raise the default-domain opset silently, or unsafely.

    Rewrites that need a newer opset call this; without ``allow_upgrade`` the user is told
    which flag turns the upgrade on. With it, the import is raised in place only when no op
    of the model changed its definition between the two versions (so relabelling is exact);
    otherwise the ops that changed are named and the user is sent to a real converter.
    QuantizeLinear/DequantizeLinear are exempt: qtool emits them for the new opset.
    """
    current = opset_version(model) or 0
    if current >= minimum:
        return
    if not allow_upgrade:
        raise UsageError(
            f"{why} needs opset {minimum}, the model has opset {current}",
            "pass --allow-opset-upgrade to let qtool raise the opset, or choose another format",
        )
    changed = ops_changed_between(model, current, minimum)
    if changed:
        raise UsageError(
            f"{why} needs opset {minimum}; raising opset {current} would change the meaning of "
            f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}",
            f"convert the model first (onnx.version_converter.convert_version(model, {minimum}) "
            "or re-export it at that opset), or choose another format",
        )
    model.opset_imports[""] = minimum


def ops_changed_between(model: ir.Model, old: int, new: int) -> list[str]:
    """Default-domain op types of ``model`` whose schema differs between opsets old and new."""
    from onnx import defs

    changed = set()
    for node in iter_nodes(model):
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        try:
            before = defs.get_schema(op, old, "").since_version
            after = defs.get_schema(op, new, "").since_version
        except defs.SchemaError:
            changed.add(op)
            continue
        if before != after:
            changed.add(op)
    return sorted(changed)


def graph_fingerprint(model: ir.Model) -> str:
    """A hash of the graph's structure: nodes, names, and initializer shapes and dtypes.

    Weights' values are deliberately left out: hashing them would read every byte of a large
    model, and a calibration table stays valid when only weight values change.
    """
    h = hashlib.sha256()
    for graph in iter_graphs(model.graph):
        for value in graph.inputs:
            h.update(f"in:{value.name}:{value.dtype}".encode())
        for value in graph.outputs:
            h.update(f"out:{value.name}".encode())
        for name, value in sorted(graph.initializers.items()):
            tensor = value.const_value
            shape = tuple(tensor.shape) if tensor is not None else ()
            h.update(f"init:{name}:{value.dtype}:{shape}".encode())
        for node in graph:
            ins = ",".join(v.name if v is not None else "" for v in node.inputs)
            outs = ",".join(v.name for v in node.outputs)
            h.update(f"node:{node.domain}:{node.op_type}:{ins}->{outs}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SaveResult:
    path: Path
    external_data: Path | None
    bytes_written: int


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Validate where a model will be written, before any work is done."""
    output = Path(output)
    if input_path is not None:
        if same_file(output, input_path):
            raise UsageError(
                f"output path {output} is the input model",
                "qtool never overwrites its input; choose another -o path",
            )
        if output.exists():
            # Writing over a file that the input's external data lives in would corrupt it.
            for data_file in _external_files_of(Path(input_path)):
                if same_file(output, data_file):
                    raise UsageError(
                        f"output path {output} is the input model's external data file",
                        "choose another -o path",
                    )
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise UsageError(
            f"output folder {parent} does not exist", f"create it first: mkdir -p {parent}"
        )
    if not os.access(parent, os.W_OK):
        raise UsageError(
            f"output folder {parent} is not writable", "choose a folder you can write to"
        )
    if output.is_dir():
        raise UsageError(f"output path {output} is a folder", "give a file name ending in .onnx")
    return output


def _external_files_of(path: Path) -> set[Path]:
    """The external data files ``path``'s initializers name (read from the protobuf alone:
    no onnx-ir graph is built and no weight is read)."""
    import onnx

    files: set[Path] = set()
    with contextlib.suppress(Exception):
        # A large single-file model is walked without its weights (qtool.mapped).
        proto = mapped.skeleton(path)
        if proto is None:
            proto = onnx.load_model(str(path), load_external_data=False)
        graphs = [proto.graph]
        while graphs:
            graph = graphs.pop()
            for t in graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    location = next((e.value for e in t.external_data if e.key == "location"), None)
                    if location:
                        files.add(path.parent / location)
            for node in graph.node:
                for attr in node.attribute:
                    graphs += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
    return files


def add_provenance(model: ir.Model, recipe: dict | None = None, source: str | None = None) -> None:
    """Record what made this model in metadata_props (qtool.version, .date, .recipe, .source);
    the date is SOURCE_DATE_EPOCH when that is set."""
    props = model.metadata_props
    props[PROVENANCE_PREFIX + "version"] = __version__
    # SOURCE_DATE_EPOCH (the reproducible-builds convention) pins the date, so two runs of
    # the same conversion can be compared byte for byte.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch and epoch.isdigit()
            else datetime.datetime.now(datetime.timezone.utc))
    props[PROVENANCE_PREFIX + "date"] = when.isoformat(timespec="seconds")
    if recipe is not None:
        props[PROVENANCE_PREFIX + "recipe"] = json.dumps(recipe, sort_keys=True, default=str)
    if source is not None:
        props[PROVENANCE_PREFIX + "source"] = source


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
    verify: bool = True,
    on_tensor: Callable[[int, int], None] | None = None,
) -> SaveResult:
    """Write ``model`` to ``path`` atomically; return where it went.

    ``external_data``: True forces a ``<name>.data`` file beside the model, None decides by
    size (external when the initializers would break protobuf's 2 GiB limit).
    ``verify`` checks the MatMulNBits tensor shapes, then loads the written file with
    onnxruntime (:func:`verify_loads`) before it is moved into place, so a model that fails
    to load is never left behind. ``on_tensor(done_bytes, total_bytes)``
    reports progress (tensors written, tensors in all) while external data is written.
    """
    path = check_output_path(path, input_path)
    if verify and (problem := check_matmulnbits_shapes(model)):
        raise ModelError(
            f"the converted model would fail in onnxruntime: {problem}",
            "nothing was written; run with --verbose and report this as a qtool bug",
        )
    if external_data is None:
        external_data = initializer_bytes(model) > PROTOBUF_LIMIT_BYTES
    data_name = path.name + ".data" if external_data else None

    if data_name is None and any(isinstance(t, ir.ExternalTensor) for t in iter_initializers(model)):
        # Saving inline: weights still referencing the input's external data file (e.g. the
        # float LayerNorm weights left after weight-only quantization) must be copied in,
        # or the output would point at a data file that is not beside it.
        ir.external_data.load_to_model(model)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".qtool-", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        callback = None
        if on_tensor is not None and data_name is not None:
            done = 0

            def callback(tensor, info):  # noqa: ANN001 - onnx-ir's callback signature
                nonlocal done
                done += 1  # callbacks may arrive out of index order: count them
                on_tensor(done, info.total)

        try:
            ir.save(model, tmp_model, external_data=data_name, callback=callback)
        except OSError as exc:
            raise ModelError(
                f"could not write {path}: {exc.strerror or exc}",
                "check free disk space and permissions of the output folder",
            ) from None
        if verify:
            verify_loads(tmp_model)
        written = tmp_model.stat().st_size
        data_path = None
        if data_name is not None:
            data_path = path.parent / data_name
            written += (tmp_dir / data_name).stat().st_size
            os.replace(tmp_dir / data_name, data_path)
        os.replace(tmp_model, path)
        return SaveResult(path=path, external_data=data_path, bytes_written=written)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def verify_loads(path: str | os.PathLike) -> None:
    """Raise ModelError unless onnxruntime can build a CPU session from ``path``.

    The session is built without graph optimisations and without weight prepacking. What
    still runs: graph resolution, type and shape inference, kernel creation, and every
    initializer read against its external-data extent. Prepacking (re-laying MatMulNBits
    weights for the int8 kernels) was 0.4-0.6 s of the check on the 0.6 B decoder's 4-bit
    output, the session without it under 0.01 s; it was also the step that rejected MatMulNBits
    tensors of the wrong shape, so :func:`save` checks those shapes on the model first
    (:func:`check_matmulnbits_shapes`).
    """
    import onnxruntime as ort

    from qtool.runtime.sessions import session_options

    # Full optimisation would spend seconds on large models; loading and resolving the
    # graph is the check we want.
    options = session_options(optimization="disable", prepacking=False)
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(
            f"onnxruntime cannot load the converted model: {_short(exc)}",
            "nothing was written; run with --verbose and report this as a qtool bug",
        ) from None


def check_matmulnbits_shapes(model: ir.Model) -> str | None:
    """The first com.microsoft MatMulNBits whose constant inputs do not fit its attributes.

    With nb = ceil(K / block_size): B is uint8 [N, nb, block_size*bits/8], scales hold
    N*nb values, uint8 zero points N*ceil(nb*bits/8) (float ones N*nb) -- what onnxruntime's
    weight prepacking enforces, which :func:`verify_loads` skips. None if all fit.
    """
    for node in iter_nodes(model):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        bits, bs = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size", 0)
        if bs < 16 or bits not in (2, 4, 8):
            return f"{node.name}: block_size {bs} / bits {bits} are not supported"
        nb = -(-k // bs)
        inputs = list(node.inputs) + [None] * 4
        consts = [None if v is None else v.const_value for v in inputs[:4]]
        want = {2: n * nb}
        if consts[3] is not None:
            want[3] = n * (-(-nb * bits // 8)) if consts[3].dtype == ir.DataType.UINT8 else n * nb
        if consts[1] is not None and tuple(consts[1].shape) != (n, nb, bs * bits // 8):
            return (f"{node.name}: B has shape {list(consts[1].shape)}, K={k} N={n} need "
                    f"{[n, nb, bs * bits // 8]}")
        for i, size in want.items():
            if consts[i] is not None and consts[i].size != size:
                return f"{node.name}: input {i} holds {consts[i].size} values, K={k} N={n} need {size}"
    return None


def model_size_bytes(path: str | os.PathLike, loaded: ir.Model | None = None) -> int:
    """File size plus the size of every external data file it references.

    ``loaded``: the model as loaded from ``path`` (before any change); its external tensors
    name the data files, so the file is not parsed again (for a large single-file model
    that parse reads every weight).
    """
    path = Path(path)
    if loaded is None:
        files = _external_files_of(path)
    else:
        files = {Path(t.base_dir) / t.location for t in iter_initializers(loaded)
                 if isinstance(t, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in files)
