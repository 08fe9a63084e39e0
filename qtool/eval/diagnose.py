"""``qtool eval --diagnose``: which layers of the candidate lose the precision, and what to do.

The layers are ranked by their own error (qtool.pipeline.layers: local SQNR, each layer fed
with the reference's values of its inputs), worst first. The ``top`` worst quantized ones
are only candidates: each is checked by re-converting without it and measuring the output
SQNR (qtool.eval.suggest), and only those that measurably help are suggested, for
``--exclude`` (int8 candidates: keep them in float) or ``--keep-8bit`` (4-bit and lower
candidates), as flags and as a ready-to-paste recipe snippet of ``[[layer]]`` overrides,
with the gain.
"""

from __future__ import annotations

import os
import shlex

from qtool.pipeline.layers import layer_groups, ranked_layers

_LOW_BIT_TYPES = {21, 22, 23, 24, 25, 26}  # UINT4, INT4, FLOAT4E2M1, ... (onnx TensorProto)


def _is_low_bit(candidate_proto) -> bool:
    if any(n.op_type == "MatMulNBits" for n in candidate_proto.graph.node):
        return True
    return any(i.data_type in _LOW_BIT_TYPES for i in candidate_proto.graph.initializer)


def diagnose(
    candidate: str | os.PathLike,
    reference: str | os.PathLike,
    dataset,
    *,
    batch_size: int = 1,
    limit: int = 0,
    top: int = 5,
    threads: int = 0,
    check: bool = True,
) -> dict:
    """Per-layer SQNR of ``candidate`` against ``reference`` on ``dataset``; see the module doc.

    ``check``: re-convert with each of the ``top`` worst layers left out and keep only the
    suggestions that measurably raise the output SQNR (qtool.eval.suggest).
    """
    ref_proto, cand_proto, layers, samples = ranked_layers(candidate, reference, dataset, batch_size=batch_size,
                                                            limit=limit, threads=threads)
    candidates = layer_groups(layers, ref_proto, top)
    low_bit = _is_low_bit(cand_proto)
    if check:
        from qtool.eval.suggest import RECIPE_KEY, check_suggestions

        recipe_json = {p.key: p.value for p in cand_proto.metadata_props}.get(RECIPE_KEY)
        checked = check_suggestions(reference, recipe_json, candidates, dataset,
                                    count=limit or len(dataset), low_bit=low_bit, threads=threads)
    else:
        checked = {"checks": [], "suggested": [], "note": "suggestions not checked (check=False)"}
    return {"samples": samples, "matched_tensors": len(layers), "top": top, "layers": layers,
            **_advice(checked, low_bit)}


def _advice(checked: dict, low_bit: bool) -> dict:
    """The report's suggestion fields from the checked exclusions (qtool.eval.suggest)."""
    suggested = checked["suggested"]
    flag = "--keep-8bit" if low_bit else "--exclude"
    if suggested:
        advice = (f"measured: re-converting with {len(suggested)} layer(s) "
                  + ("kept at 8 bits" if low_bit else "left in float")
                  + f" raises the output SQNR from {checked['baseline_sqnr_db']:.2f} to "
                  f"{checked['suggested_sqnr_db']:.2f} dB ({checked['suggested_gain_db']:+.2f} dB)")
    else:
        advice = checked.get("note") or "no quantized layer to suggest"
    return {
        "suggested": suggested,
        # qtool convert flags: keep in float (int8 candidates) or at 8 bits (low-bit ones)
        "exclude_flags": [f"{flag} {shlex.quote(s)}" for s in suggested],
        "recipe_snippet": recipe_snippet(suggested, 8 if low_bit else 32),
        "advice": advice,
        "checks": checked["checks"],
        "baseline_sqnr_db": checked.get("baseline_sqnr_db"),
        "suggested_gain_db": checked.get("suggested_gain_db"),
    }


def recipe_snippet(nodes: list[str], bits: int) -> str:
    """``[[layer]]`` overrides for ``nodes`` (see qtool.config.LayerOverride)."""
    if not nodes:
        return ""
    what = "in float" if bits == 32 else f"at {bits} bits"
    lines = [f"# from qtool eval --diagnose: keep {what} the layers whose re-conversion measured a gain"]
    for n in nodes:
        lines += ["[[layer]]", f"match = {_toml_str(n)}", f"bits = {bits}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
