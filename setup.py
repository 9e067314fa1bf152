"""Declares the one C extension, hyperpipe._core, and nothing else.

The extension is optional: if it cannot be compiled (no compiler, no Python headers, an
unsupported platform), the build warns and hyperpipe falls back to its socket transport
(and says so at the first Pipe() and in `python -m hyperpipe`).

Environment switches:
  HYPERPIPE_SANITIZE=address|thread|undefined   build with that sanitizer
  HYPERPIPE_DEBUG=1                            -O0 -g, assertions on
  HYPERPIPE_REQUIRE_CORE=1                     fail the build instead of falling back
                                               (and `import hyperpipe` without the core)
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/hyperpipe/csrc"
sources = ["src/hyperpipe/_core.c"] + sorted(
    os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".c")
) if os.path.isdir(CSRC) else ["src/hyperpipe/_core.c"]

cflags = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]
ldflags = []
if os.environ.get("HYPERPIPE_DEBUG"):
    cflags += ["-O0", "-g", "-UNDEBUG"]
else:
    cflags += ["-O2"]
require_core = os.environ.get("HYPERPIPE_REQUIRE_CORE", "") not in ("", "0")
sanitize = os.environ.get("HYPERPIPE_SANITIZE")
if sanitize:
    cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    ldflags += [f"-fsanitize={sanitize}"]


class OptionalBuildExt(build_ext):
    """Build the extension, but let the package install without it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
            self._fallback(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    _failed = False

    def _fallback(self, exc):
        if require_core:
            raise exc
        if self._failed:  # the in-place copy that follows a failed build fails too: said already
            return
        self._failed = True
        sys.stderr.write(
            f"WARNING: hyperpipe._core was not built ({exc}); hyperpipe will use its socket "
            "transport. Install a C compiler and the Python headers, then reinstall.\n"
        )


setup(
    ext_modules=[
        Extension(
            "hyperpipe._core",
            sources=sources,
            include_dirs=[CSRC],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            # Not setuptools' optional=True: it would swallow the failure even when required.
            optional=False,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
