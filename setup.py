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
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/hyperpipe/csrc"
#: why the last build of the core failed, next to the package (read by hyperpipe._core_status)
BUILD_ERROR_FILE = "_core_build_error.txt"
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
    """Build the extension, but let the package install without it, leaving the reason in
    the package (BUILD_ERROR_FILE) for hyperpipe to name when it falls back."""

    _failure = None

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
            self._fallback(exc)
        self._record_outcome()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    def _fallback(self, exc):
        if require_core:
            raise exc
        if self._failure is not None:  # the in-place copy that follows a failed build fails too
            return
        self._failure = _cause(exc)
        sys.stderr.write(
            f"WARNING: hyperpipe._core was not built ({self._failure}); hyperpipe will use its "
            "socket transport. Install a C compiler and the Python headers, then reinstall.\n"
        )

    def _record_outcome(self):
        folders = [os.path.join(self.build_lib, "hyperpipe")]
        if self.inplace or getattr(self, "editable_mode", False):
            folders.append(self.get_finalized_command("build_py").get_package_dir("hyperpipe"))
        for folder in folders:
            path = os.path.join(folder, BUILD_ERROR_FILE)
            if self._failure is None:
                if os.path.exists(path):  # from an earlier build that failed
                    os.remove(path)
            else:
                os.makedirs(folder, exist_ok=True)
                with open(path, "w") as f:
                    f.write(self._failure + "\n")


def _cause(exc):
    """The build failure in words a user can act on."""
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"the Python headers are missing (no Python.h in {include})"
    while exc is not None:
        if isinstance(exc, FileNotFoundError) and exc.filename:
            return f"no C compiler: {exc.filename} not found"
        if isinstance(exc, subprocess.CalledProcessError):  # its message is the whole command line
            return (f"the C compiler ({exc.cmd[0]}) failed with exit status {exc.returncode}; "
                    "`pip install -v` shows its messages")
        exc = exc.__cause__ or exc.__context__
    return "the C compiler failed; `pip install -v` shows its messages"


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
