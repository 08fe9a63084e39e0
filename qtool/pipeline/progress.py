"""How library code reports progress without printing: a factory of progress contexts.

``progress(description, total, unit)`` is a context manager yielding ``advance(n)``; the
CLI passes its Rich progress bars, a Python caller passes nothing (``no_progress``).
``total`` None means unknown: bars then show a count and elapsed time, never a rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

ProgressFactory = Callable[[str, "float | None", str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def no_progress(description: str, total: float | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None
