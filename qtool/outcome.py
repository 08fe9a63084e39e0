"""Did a conversion achieve anything? A conversion that quantizes nothing, or writes a model
larger than its input, must say so plainly instead of reporting success.

    problems = conversion_problems(summary, input_bytes, output_bytes)   # [] when fine
    check_conversion(summary, input_bytes, output_bytes)                 # raises NoGain

``summary`` is the ``ConvertSummary`` of ``qtool.convert.convert_with_summary``; sizes are in
bytes (the input model's file(s) and the written output's, external data included).
"""

from __future__ import annotations

from qtool.errors import EXIT_GATE_FAILED, QtoolError


class NoGain(QtoolError):
    """The conversion changed nothing worth writing: nothing quantized, or a larger model (exit 3)."""

    exit_code = EXIT_GATE_FAILED


def _top_reasons(summary, limit: int = 3) -> str:
    """The most frequent reasons nodes stayed float, as ``reason (n)``."""
    counts: dict[str, int] = {}
    for reasons in summary.reasons.values():
        for reason, n in reasons.items():
            counts[reason] = counts.get(reason, 0) + n
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return "; ".join(f"{reason} ({n})" for reason, n in top)


def conversion_problems(summary, input_bytes: int, output_bytes: int) -> list[str]:
    """What is wrong with a conversion's outcome, one plain sentence each ([] when nothing is)."""
    problems = []
    if sum(summary.quantized.values()) == 0:
        why = _top_reasons(summary)
        problems.append("nothing was quantized: every node stayed float" + (f" ({why})" if why else ""))
    if input_bytes > 0 and output_bytes > input_bytes:
        problems.append(f"the output is larger than the input: {output_bytes / 1e6:.2f} MB from "
                        f"{input_bytes / 1e6:.2f} MB ({output_bytes / input_bytes:.2f}x)")
    return problems


def check_conversion(summary, input_bytes: int, output_bytes: int) -> None:
    """Raise NoGain naming every problem of ``conversion_problems``; return when there is none."""
    problems = conversion_problems(summary, input_bytes, output_bytes)
    if problems:
        raise NoGain("; ".join(problems),
                     "try another scheme (--dynamic, static int8 with --data, --bits 4), or "
                     "`qtool inspect MODEL` to see which ops the model is made of")
