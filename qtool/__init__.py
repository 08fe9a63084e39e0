"""qtool: compress ONNX models and prove the result.

The CLI (`qtool ...`) is a thin shell over this package's Python API.
"""

__version__ = "0.1.0"
