"""Atomic writes for the small files qtool produces (tables, reports, recipes).

Models go through ``qtool.model.save``; everything else through ``write_text_atomic``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qtool.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and a failure leaves the old file untouched.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist", f"create it first: mkdir -p {parent}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder", "give a file name")
    fd, tmp = tempfile.mkstemp(prefix=".qtool-", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
