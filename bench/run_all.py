"""`make bench`: prepare the model zoo, then run every side-by-side benchmark in turn.

Each benchmark writes its own table into bench/results/; this script only sequences them
and stops at the first failure. `--only NAME ...` runs a subset (names as in BENCHES).
Expect about an hour on 2 cores (SmolLM2's GPTQ and tuning runs dominate).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {
    "zoo": ["zoo.py", "prepare"],
    "kernels": ["kernels.py"],
    "calibration": ["calibration.py"],
    "convert_int8": ["convert_int8.py"],
    "convert_lowbit": ["convert_lowbit.py"],
    "diagnose": ["diagnose_smollm2.py"],
    "latency_repro": ["latency_repro.py"],
    "tune": ["tune.py"],
    "sweep": ["sweep.py"],
    "targets": ["targets.py"],
    "runtimes": ["runtimes.py"],
    "a16w8": ["a16w8.py"],
    "recovery": ["recovery.py"],
    "qat": ["qat.py"],
    "scale": ["scale.py"],
    "gptq_speed": ["gptq_speed.py"],
    "diagnose_check": ["diagnose_check.py"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(BENCHES), default=list(BENCHES))
    args = parser.parse_args()
    for name in BENCHES:
        if name not in args.only:
            continue
        script, *rest = BENCHES[name]
        print(f"== bench {name}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / script), *rest]).returncode
        print(f"== bench {name}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            return code
    print("results in", HERE / "results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
