import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_import_apportion_is_torch_free():
    mods = _modules_after("import apportion")
    assert "torch" not in mods and "transformers" not in mods


def test_loading_plugins_is_torch_free():
    mods = _modules_after("import apportion; apportion.get_registry()")
    assert "torch" not in mods


def test_cli_plugins_is_torch_free():
    code = (
        "import sys; sys.argv = ['apportion', 'plugins', '--json']\n"
        "from apportion.cli import main\nmain()"
    )
    mods = _modules_after(code)
    assert "torch" not in mods
