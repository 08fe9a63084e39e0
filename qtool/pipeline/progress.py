"""How library code reports progress without printing: a factory of progress contexts.

``progress(description, total, unit)`` is a context manager yielding ``advance(n=1,
total=None)`` (``total``: set the total, for a callee that learns it late); the CLI passes
its Rich progress bars, a Python caller passes nothing (``no_progress``). ``total`` None
means unknown: bars then show a count and elapsed time, never a rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

ProgressFactory = Callable[[str, "float | None", str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def no_progress(description: str, total: float | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
    yield lambda n=1, total=None: None


def stage_advance(advance: Callable[..., None]) -> Callable[[str, int, int], None]:
    """A ``(stage, done, total)`` callback (qtool.pipeline.context.StageProgress) driving one
    bar made with no unit: stages count different things (weight bytes, nodes), so the bar
    shows each stage's fraction done, starting again at a new stage."""
    state = {"stage": None, "done": 0}

    def on_stage(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            advance(-state["done"], total=total)
            state["stage"], state["done"] = stage, 0
        advance(done - state["done"], total=total)
        state["done"] = done

    return on_stage
