"""What this machine offers quantized kernels: ISA features, onnxruntime, qtool's backend."""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flag -> the name users know; the order is the order we print.
_X86_FLAGS = {
    "sse4_1": "SSE4.1",
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512F",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}
_ARM_FLAGS = {"asimd": "NEON", "asimddp": "dot-product", "i8mm": "I8MM", "sve": "SVE", "sve2": "SVE2"}


def cpu_features() -> dict:
    """CPU model and the instruction-set features relevant to int8/int4 kernels."""
    machine = platform.machine()
    flags: set[str] = set()
    model_name = platform.processor() or machine
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key in ("model name", "cpu model") and model_name in (machine, ""):
                model_name = value.strip()
    table = _ARM_FLAGS if machine in ("aarch64", "arm64") else _X86_FLAGS
    present = {label: (flag in flags) for flag, label in table.items()}
    return {"machine": machine, "model": model_name, "features": present, "cores": available_cores()}


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def int8_advice(features: dict[str, bool]) -> str:
    """One line on what int8 will do on this CPU."""
    if features.get("AMX-INT8") or features.get("AVX-512 VNNI") or features.get("AVX-VNNI"):
        return "VNNI present: int8 GEMMs run on dot-product instructions (u8 activations x s8 weights)"
    if features.get("AVX2"):
        return "no VNNI: int8 uses AVX2 multiply-add; expect smaller int8 speed-ups"
    if features.get("dot-product"):
        return "Arm dot-product present: int8 GEMMs run on SDOT/UDOT"
    return "no int8 dot-product instructions found: int8 may not be faster than float here"


_X86 = ("x86_64", "AMD64", "i686", "x86")
_VNNI = ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8")


def cpu_int8_target(machine: str, features: dict[str, bool]) -> dict:
    """Which ``--target cpu`` variant fits a CPU, and why.

    cpu-avx2 on x86 without VNNI: onnxruntime's u8 x s8 kernels then use VPMADDUBSW, which
    sums two u8*s8 products into a saturating int16 (onnxruntime #5849, #14642); 7-bit
    weights keep 2 * 255 * 63 = 32130 below 32767. cpu-vnni otherwise (VPDPBUSD/AMX sum
    into int32 and cannot saturate; Arm's SDOT/UDOT likewise).
    """
    if machine in _X86 and not any(features.get(k) for k in _VNNI) and features.get("AVX2"):
        return {"target": "cpu-avx2", "why": "x86 without VNNI: u8 x s8 products pass through a saturating "
                "int16 add (VPMADDUBSW), so weights are kept to 7 bits (reduce-range)"}
    if machine in _X86 and any(features.get(k) for k in _VNNI):
        return {"target": "cpu-vnni", "why": "VNNI/AMX int8 dot products accumulate in int32: no saturation, "
                "full 8-bit weights, u8 activations x s8 weights"}
    return {"target": "cpu-vnni", "why": "no saturating x86 u8 x s8 path on this CPU; the default QDQ applies"}


def runtime_info() -> dict:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def kernel_backend() -> dict:
    """Which qtool kernel backend is active and which ISA paths it dispatches to."""
    try:
        from qtool import kernels

        return {"backend": kernels.BACKEND, "isa_paths": list(kernels.isa_paths())}
    except Exception as exc:  # the kernel package failed to import: report, don't crash
        return {"backend": "unavailable", "isa_paths": [], "error": str(exc)}


def hardware_report() -> dict:
    cpu = cpu_features()
    return {
        "cpu": cpu,
        "int8_advice": int8_advice(cpu["features"]),
        "cpu_target": cpu_int8_target(cpu["machine"], cpu["features"]),
        "runtime": runtime_info(),
        "qtool_kernels": kernel_backend(),
        "python": platform.python_version(),
    }
