"""The `subnetscope` command (issue 18): one subcommand per top-level script, --help that loads no framework,
unknown names refused in one line. Run as `python -m subnetscope`, so no installed console script is needed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from subnetscope.cli import app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl")


def run_module(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m subnetscope ARGS` in the repository root, and the modules it imported by import statements
    (-X importtime leaves out importlib.import_module's own module, not what that module imports)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "subnetscope", *args], capture_output=True,
                            text=True, cwd=ROOT, timeout=120, check=False)
    rows = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result, set(rows[1:])  # the first row names the columns


def script_entries() -> dict[str, str]:
    """Each runnable top-level script (it has a __main__ block) and the module whose main it calls."""
    entries = {}
    for path in sorted(ROOT.glob("*.py")):
        text = path.read_text()
        if 'if __name__ == "__main__":' in text:
            entries[path.name] = re.search(r"^from (\S+) import main$", text, re.M).group(1)
    return entries


def test_every_script_has_its_subcommand():
    scripts = script_entries()
    assert "utils.py" not in scripts and "main_grpo.py" in scripts  # the scan finds the scripts, not the library
    assert {c.script: c.module for c in app.COMMANDS.values() if c.script} == scripts
    models = app.COMMANDS["models"]  # `python -m subnetscope.models` runs real_models.main
    assert models.script is None
    assert re.search(rf"from \.{models.module.rsplit('.', 1)[1]} import main",
                     (ROOT / "subnetscope" / "models.py").read_text())
    readme = (ROOT / "README.md").read_text()
    for name, command in app.COMMANDS.items():
        assert re.search(rf"^\| `{re.escape(name)}` \| `python (-m )?\S+` \|$", readme, re.M), name


def test_help_lists_every_subcommand_and_loads_no_framework():
    result, imported = run_module("--help")
    assert result.returncode == 0, result.stderr
    listed = [m.group(1) for m in re.finditer(r"^  (\S+)  +\S", result.stdout, re.M)]
    assert listed == list(app.COMMANDS)
    assert "subnetscope.cli.app" in imported  # the import list is read
    assert not {m.split(".")[0] for m in imported} & set(HEAVY)
    assert not {m for m in imported if m.startswith("subnetscope.cli.")} - {"subnetscope.cli.app"}


def test_subcommand_help_through_python_m():
    result, imported = run_module("grpo", "--help")
    assert result.returncode == 0, result.stderr
    assert "--group_size" in result.stdout and "subnetscope.cli.app" in imported
    if sys.version_info < (3, 14):  # 3.14's argparse names a `python -m` program after the module, not argv[0]
        assert result.stdout.startswith("usage: subnetscope grpo ")
    assert not {m.split(".")[0] for m in imported} & set(HEAVY)


def test_each_subcommand_help_exits_zero(capsys):
    for name in app.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            app.main([name, "--help"])
        assert exc.value.code == 0, name
        assert capsys.readouterr().out.startswith("usage: "), name
    assert sys.argv[0] != "subnetscope export"  # the program name is put back


@pytest.mark.parametrize("argv, named", [(["nope"], None), (["main_grpo.py"], "grpo"), (["sparseft"], "sparse-ft"),
                                         ([], None)])
def test_bad_subcommand_is_one_line_exit_2(capsys, argv, named):
    with pytest.raises(SystemExit) as exc:
        app.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert all(name in err for name in app.COMMANDS)
    assert named is None or f"did you mean '{named}'" in err


def test_console_script_names_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["subnetscope"].split(":")
    assert (module, func) == (app.__name__, app.main.__name__)


def test_help_into_a_closed_pipe_prints_no_traceback():
    """`subnetscope --help | head`: the reader closes the pipe before the help is written."""
    proc = subprocess.Popen([sys.executable, "-m", "subnetscope", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
