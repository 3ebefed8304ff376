import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["apportion.testing.fixtures"]


@pytest.fixture
def plugin_dir(tmp_path):
    """Make installable-looking plugins (module + dist-info with an entry point) in a temp
    dir; ``run`` executes Python with that dir on the path and returns (rc, stdout, stderr)."""

    class Plugins:
        path = tmp_path

        def module(self, name: str, body: str) -> None:
            """A plain module beside the plugins (e.g. the components they register lazily)."""
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))

        def add(self, name: str, body: str, version: str = "0.1.0") -> None:
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
            info = tmp_path / f"{name}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(
                f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            )
            (info / "entry_points.txt").write_text(f"[apportion]\n{name} = {name}\n")

        def run(self, code: str, **env: str):
            full_env = {**os.environ, "PYTHONPATH": str(tmp_path), **env}
            full_env.pop(
                "APPORTION_STRICT_PLUGINS", None
            ) if "APPORTION_STRICT_PLUGINS" not in env else None
            proc = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(code)],
                capture_output=True,
                text=True,
                env=full_env,
                timeout=120,
            )
            return proc.returncode, proc.stdout, proc.stderr

        def report(self, **env: str) -> dict:
            rc, out, err = self.run(
                "import json; from apportion.plugins import get_plugin_host as h;"
                "print(json.dumps([p.as_dict() for p in h().plugins]))",
                **env,
            )
            assert rc == 0, err
            return {p["name"]: p for p in json.loads(out)}

    return Plugins()


@pytest.fixture
def cli_env():
    env = {**os.environ}
    env.pop("APPORTION_STRICT_PLUGINS", None)
    return env


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-m", "apportion.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def root() -> Path:
    return Path(__file__).resolve().parents[3]


def load_json(text: str):
    return json.loads(text)
