"""Quantization maths shared by the conversion passes (scales, zero points, rounding)."""
