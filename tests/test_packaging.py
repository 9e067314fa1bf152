"""hyperpipe installs right everywhere.

- Without the C core the fallback is visible: the first ``Pipe()`` warns once,
  ``python -m hyperpipe`` says why and how to fix it, ``HYPERPIPE_REQUIRE_CORE=1`` makes
  ``import hyperpipe`` fail. A missing core is simulated in a child interpreter by an import
  blocker on ``hyperpipe._core``.
- A pickled message left in a reference cycle does not crash the garbage collector of
  CPython 3.12.0 and 3.12.1 (gh-111211); ``.ci/versions`` runs this file on 3.12.
- Opt-in (``-m artefacts``, run by ``.ci/versions``): the sdist carries what builds the core and
  runs the tests; the sdist and the wheel built from it each install into a fresh venv
  with the core loaded; the sdist installed without a working compiler falls back and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Optional

import pytest

import hyperpipe
from hyperpipe._core_status import CORE_ERROR

ROOT = Path(__file__).resolve().parent.parent
#: as if the core had never been built: ``from . import _core`` raises ImportError
NO_CORE = "import sys; sys.modules['hyperpipe._core'] = None\n"
CHILD_TIMEOUT = 60
needs_core = pytest.mark.skipif(CORE_ERROR is not None, reason=f"the C core is missing here: {CORE_ERROR}")


def run_python(code: str, env: Optional[dict] = None, args: tuple = ("-c",), **kwargs: Any) -> Any:
    """Run ``code`` in a child interpreter without this process's hyperpipe switches."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERPIPE_")}
    child_env.update(env or {})
    return subprocess.run([sys.executable, *args, code], capture_output=True, text=True, env=child_env,
                          timeout=CHILD_TIMEOUT, **kwargs)


# -- the fallback without the C core ---------------------------------------------------------


def test_without_the_core_the_first_pipe_warns_once_and_the_socket_transport_works() -> None:
    code = NO_CORE + """
import warnings
import hyperpipe
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # a second warning would be recorded, whichever line
    for i in range(3):
        a, b = hyperpipe.Pipe()
        a.send(("round", i))
        assert b.recv() == ("round", i) and a.transport == "socket"
        a.close(); b.close()
print(len(caught))
for w in caught:
    print(w.category.__name__, w.filename, w.lineno)
    print(w.message)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    count, where, message = proc.stdout.splitlines()[:3]
    assert count == "1"
    pipe_line = code.splitlines().index("        a, b = hyperpipe.Pipe()") + 1
    assert where == f"RuntimeWarning <string> {pipe_line}"  # it points at the caller
    assert "C core did not load (import of hyperpipe._core halted" in message  # the cause
    assert "uses the socket transport" in message
    assert "install a C compiler and the Python headers" in message and "reinstall" in message  # the fix


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_asking_for_the_socket_transport_does_not_warn(how: str) -> None:
    call = "hyperpipe.Pipe(transport='socket')" if how == "argument" else "hyperpipe.Pipe()"
    env = {"HYPERPIPE_TRANSPORT": "socket"} if how == "environment" else {}
    proc = run_python(NO_CORE + f"import hyperpipe\na, b = {call}\nprint(a.transport)", env=env,
                      args=("-W", "error", "-c"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "socket"


def test_require_core_makes_import_fail_with_the_reason() -> None:
    proc = run_python(NO_CORE + "import hyperpipe", env={"HYPERPIPE_REQUIRE_CORE": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: hyperpipe's C core did not load (import of hyperpipe._core halted")
    assert "HYPERPIPE_REQUIRE_CORE is set" in last and "install a C compiler" in last


@needs_core
def test_require_core_with_the_core_imports() -> None:
    proc = run_python("import hyperpipe; print(hyperpipe.info()['core'])", env={"HYPERPIPE_REQUIRE_CORE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded"


def test_python_m_hyperpipe_without_the_core_gives_the_reason_and_the_fix() -> None:
    proc = run_python(NO_CORE + "import runpy; runpy.run_module('hyperpipe', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "transport: socket" in lines and "available_transports: socket" in lines
    assert "core: missing (import of hyperpipe._core halted; None in sys.modules)" in lines
    assert "To fix it, install a C compiler and the Python headers" in proc.stdout


@needs_core
def test_python_m_hyperpipe_with_the_core() -> None:
    proc = run_python("hyperpipe", args=("-m",))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"version: {hyperpipe.__version__}" in lines and "core: loaded" in lines
    assert f"transport: {hyperpipe.info()['transport']}" in lines
    assert "To fix it" not in proc.stdout


# -- CPython 3.12.0/3.12.1: a BytesIO view in a reference cycle crashes the gc (gh-111211) ---------

# The failing call's frame stays reachable from the exception this frame keeps: a cycle
# through every local of the send path (the pickled message among them).
CYCLE = """
import gc
import hyperpipe

def attempt():
    {setup}
    try:
        for _ in range(100):  # a TCP peer's close may take a few sends to notice
            sender.send({{"payload": list(range(100))}})
    except OSError as exc:
        err = exc
    else:
        raise SystemExit("the send did not fail")

attempt()
gc.collect()
print("survived")
"""

SETUPS = {
    "socket": "sender, peer = hyperpipe.Pipe(transport='socket'); peer.close()",
    "shm": "sender, peer = hyperpipe.Pipe(transport='shm'); peer.close()",
    "tcp": """listener = hyperpipe.Listener(("127.0.0.1", 0))
    sender = hyperpipe.Client(listener.address)
    listener.accept().close()
    listener.close()""",
}


@pytest.mark.parametrize("transport", sorted(SETUPS))
def test_a_message_in_a_reference_cycle_does_not_crash_the_gc(transport: str) -> None:
    if transport not in hyperpipe.info()["available_transports"] + ["tcp"]:
        pytest.skip(f"the {transport} transport is not available here")
    proc = run_python(CYCLE.format(setup=SETUPS[transport]))
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr}"
    assert proc.stdout.strip() == "survived"


# -- the artefacts (opt-in) ----------------------------------------------------------------------

#: what a user of the sdist needs besides the Python sources: the C core with its headers,
#: the licence, the tests, docs, examples and ./dev
SDIST_MUST_HAVE = ["LICENSE", "README.md", "dev", "pyproject.toml", "setup.py", "src/hyperpipe/_core.c",
                   "src/hyperpipe/_core.pyi", "src/hyperpipe/py.typed", "tests/conftest.py", "docs/design.md"]
SDIST_TREES = ("src", "tests", "docs", "examples")

CHECK_INSTALL = """
import hyperpipe
info = hyperpipe.info()
assert info["core"] == "loaded", info
a, b = hyperpipe.Pipe()
a.send({"x": [1, 2.5, "three"]})
assert b.recv() == {"x": [1, 2.5, "three"]}
print(hyperpipe.__file__, a.transport)
"""


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The sdist, the wheel built from it, and the build's output (opt-in: -m artefacts)."""
    if "artefacts" not in (request.config.getoption("markexpr", "") or ""):
        pytest.skip("opt-in: run with -m artefacts")
    pytest.importorskip("build", reason="pip install build (in hyperpipe's test extra)")
    dist = tmp_path_factory.mktemp("dist")
    # No arguments: the sdist first, then the wheel built from the unpacked sdist.
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True,
                          text=True, env=dict(os.environ, HYPERPIPE_REQUIRE_CORE="1"), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    (sdist,) = dist.glob("hyperpipe-*.tar.gz")
    (wheel,) = dist.glob("hyperpipe-*.whl")
    return sdist, wheel, log


def _new_venv(where: Path) -> str:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    return str(where / "bin" / "python")


def _tracked_files() -> list[str]:
    """The version-controlled files the sdist must carry (none when this is not a git checkout)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return []
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *SDIST_TREES], capture_output=True, text=True,
                         check=True, timeout=CHILD_TIMEOUT).stdout
    return out.split()


@pytest.mark.artefacts
def test_sdist_and_wheel_install_with_the_core(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    sdist, wheel, log = built
    assert "deprecat" not in log.lower(), log  # e.g. setuptools' warning about a license table

    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [f for f in SDIST_MUST_HAVE + _tracked_files() if f not in names]
    assert not missing, f"the sdist lacks {missing}"
    headers = [n for n in names if n.startswith("src/hyperpipe/csrc/") and n.endswith(".h")]
    assert headers, "the sdist carries no C headers"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]

    for artefact in (sdist, wheel):
        venv = tmp_path / f"venv-{artefact.suffix.strip('.')}"
        python = _new_venv(venv)
        # REQUIRE_CORE: installing the sdist compiles the core, and must fail if it cannot
        installed = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                    str(artefact)], capture_output=True, text=True, timeout=900,
                                   env=dict(os.environ, HYPERPIPE_REQUIRE_CORE="1"))
        assert installed.returncode == 0, installed.stdout + installed.stderr
        # From outside the checkout, so that the installed copy is the one imported.
        checked = subprocess.run([python, "-c", CHECK_INSTALL], capture_output=True, text=True, cwd=tmp_path,
                                 env=dict(os.environ, HYPERPIPE_REQUIRE_CORE="1"), timeout=CHILD_TIMEOUT)
        assert checked.returncode == 0, checked.stderr
        where, transport = checked.stdout.split()
        assert where.startswith(str(venv)) and transport == "shm"


@pytest.mark.artefacts
def test_an_install_without_a_compiler_falls_back_and_says_why(built: tuple[Path, Path, str],
                                                               tmp_path: Path) -> None:
    python = _new_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERPIPE_")}
    # CC=false: a compiler that always fails. From the sdist: no earlier build to reuse.
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                "--no-cache-dir", str(built[0])], capture_output=True, text=True, timeout=900,
                               env=dict(env, CC="false"))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shown = subprocess.run([python, "-W", "always", "-c", "import hyperpipe; hyperpipe.Pipe()"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=CHILD_TIMEOUT)
    assert shown.returncode == 0, shown.stderr
    assert "RuntimeWarning: hyperpipe's C core did not load (No module named 'hyperpipe._core'; compiling it " \
        "failed: the C compiler (false) failed with exit status 1" in shown.stderr
    assert "install a C compiler and the Python headers" in shown.stderr
    info = subprocess.run([python, "-m", "hyperpipe"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=CHILD_TIMEOUT)
    assert "core: missing (No module named 'hyperpipe._core'; compiling it failed" in info.stdout
