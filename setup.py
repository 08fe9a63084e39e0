"""Build hooks (the project's metadata lives in pyproject.toml).

- The cffi extension is compiled at install time. If that fails (no C compiler, an
  unsupported platform), the install still succeeds and qtool runs on its numpy
  reference kernels; ``qtool --version`` then reports the numpy backend.
- The recipe presets live once, in the repository's ``configs/`` (where users and
  ``--recipe configs/NAME.toml`` find them). Wheels get a copy as ``qtool/configs/*.toml``;
  a checkout (an editable install, or the tree on PYTHONPATH) reads ``configs/`` directly
  (``qtool.config.CONFIG_DIR``). Copying at build time, rather than mapping a package
  folder onto ``configs/``, keeps the layout simple, so an editable install is one .pth
  entry and installs without setuptools' warnings.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use numpy"
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            f"warning: qtool native kernels not built ({exc}); "
            "qtool will use its numpy kernels (slower, same results)\n"
        )


class BuildPyWithPresets(build_py):
    """build_py that also copies configs/*.toml into the package as qtool/configs/."""

    def run(self):
        super().run()
        target = Path(self.build_lib, "qtool", "configs")
        self.mkpath(str(target))
        for preset in sorted(Path(__file__).resolve().parent.joinpath("configs").glob("*.toml")):
            self.copy_file(str(preset), str(target / preset.name))


setup(
    cffi_modules=["qtool/kernels/_build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithPresets},
)
