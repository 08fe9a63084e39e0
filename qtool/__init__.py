"""qtool: compress ONNX models and prove the result.

The CLI (`qtool ...`) is a thin shell over this package's Python API.
"""

from qtool._deferred import defer_unused

__version__ = "0.1.0"

defer_unused()  # before any qtool module imports onnx-ir (see qtool._deferred)
