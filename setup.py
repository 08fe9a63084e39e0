"""Build hooks (the project's metadata lives in pyproject.toml).

- The cffi extension is compiled at install time. If that fails (no C compiler, an
  unsupported platform), the install still succeeds and qtool runs on its numpy
  reference kernels; ``qtool --version`` then reports the numpy backend.
- The recipe presets live once, in the repository's ``configs/`` (where users and
  ``--recipe configs/NAME.toml`` find them); installs map that folder to the package
  ``qtool.configs``. A source checkout run without installing reads ``configs/`` directly
  (``qtool.config.CONFIG_DIR``).
"""

import sys

from setuptools import find_packages, setup
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


setup(
    packages=[*find_packages(include=["qtool", "qtool.*"]), "qtool.configs"],
    package_dir={"qtool.configs": "configs"},
    package_data={"qtool": ["eval/*.json"], "qtool.configs": ["*.toml"]},
    cffi_modules=["qtool/kernels/_build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
