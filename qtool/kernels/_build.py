"""cffi API-mode build of ``qtool.kernels._qtool_native`` from native/src/*.c.

Run by setuptools through ``setup(cffi_modules=["qtool/kernels/_build.py:ffibuilder"])``;
``python qtool/kernels/_build.py`` builds it in place for development.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from cffi import FFI

_ROOT = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

HEADER = os.path.join(_ROOT, "native", "include", "qtool.h")


def cdef_from_header(text: str) -> str:
    """The declarations cffi needs, read from qtool.h itself (the contract is written once):
    comments, the C++ guard and preprocessor lines go, except ``#define QT_NAME <integer>``."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    keep = [line for line in text.splitlines()
            if not line.lstrip().startswith("#") or re.fullmatch(r"\s*#define QT_\w+\s+\d+\s*", line)]
    return "\n".join(keep)


with open(HEADER, encoding="utf-8") as header:
    CDEF = cdef_from_header(header.read())

_unix = sys.platform != "win32"

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "qtool.kernels._qtool_native",
    '#include "qtool.h"',
    sources=sorted(glob.glob(os.path.join(_ROOT, "native", "src", "*.c"))),
    include_dirs=[os.path.join(_ROOT, "native", "include"), os.path.join(_ROOT, "native", "src")],
    # -ffp-contract=off: no FMA contraction, so float results match numpy bit for bit.
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"] if _unix else [],
    libraries=["m"] if _unix else [],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
