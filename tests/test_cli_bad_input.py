"""The analysis commands refuse bad input in one line (exit 2) before any work: unwritable output
locations, --n_boot < 1, a malformed matrix file, a bad --nm; and run_matrix.py exits 1 when a run failed."""
import argparse
import importlib
import json

import pytest

from subnetscope import checkpoint, models
from subnetscope.cli import (
    analyze,
    app,
    check_mask,
    compare,
    compute_masks,
    localize,
    prune_report,
    weight_sparsity,
)
from subnetscope.cli import matrix as matrix_cli
from subnetscope.errors import RENAMED

from .conftest import tmpfs


def no_work(*args, **kwargs):
    raise AssertionError("work started before the input was checked")


def refused(capsys, main, argv: list[str], *needles: str) -> str:
    """Run `main`, expect exit 2 with one `error:` line holding every needle; return that line."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def readonly_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


def bad_folder(request, tmp_path, case: str):
    """An output folder that cannot be one: an existing file, a path below a file, a read-only mount."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    if case == "file":
        return blocker
    if case == "below_file":
        return blocker / "out"
    return request.getfixturevalue("readonly_dir") / "out"


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


FOLDER_CASES = ["file", "below_file", "readonly"]


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_analyze_refuses_output_dir_before_opening_models(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(analyze, "open_checkpoint", no_work)
    out = bad_folder(request, tmp_path, case)
    before = listing(tmp_path)
    refused(capsys, analyze.main, ["--base", "a", "--tuned", "b", "--output_dir", out, "--device", "cpu"],
            "--output_dir", str(out))
    assert listing(tmp_path) == before


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_localize_refuses_output_dir_before_reading_runs(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(localize, "find_step_checkpoints", no_work)
    monkeypatch.setattr(localize, "open_checkpoint", no_work)
    out = bad_folder(request, tmp_path, case)
    refused(capsys, localize.main, ["--ckpt_dirs", tmp_path / "r1", tmp_path / "r2", "--bases", "m1", "m2",
                                    "--output_dir", out, "--device", "cpu"], "--output_dir", str(out))


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_compute_masks_refuses_output_dir_before_loading_the_model(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(models, "load_causal_lm", no_work)  # compute_masks imports them when it needs them
    monkeypatch.setattr(checkpoint, "read_ever_changed", no_work)
    out = bad_folder(request, tmp_path, case)
    refused(capsys, compute_masks.main, ["--policy", "tiny-gpt2", "--output_dir", out], "--output_dir")
    refused(capsys, compute_masks.main, ["--from_run", tmp_path, "--output_dir", out], "--output_dir")


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_prune_report_refuses_output_dir_before_reading_runs(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(prune_report, "load_runs", no_work)
    out = bad_folder(request, tmp_path, case)
    refused(capsys, prune_report.main, ["--results_dir", tmp_path, "--output_dir", out], "--output_dir", str(out))


@pytest.mark.parametrize("flag", ["--output_dir", "--runs_dir"])
def test_compare_refuses_its_folders_before_training(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setattr(compare, "_train", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(capsys, compare.main, [flag, blocker / "sub", "--device", "cpu"], flag, str(blocker))


def file_target(request, tmp_path, case: str):
    """An output file that cannot be written: a folder, a path below a file, a file on a read-only mount."""
    if case == "folder":
        return tmp_path
    if case == "below_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        return blocker / "report.json"
    return request.getfixturevalue("readonly_dir") / "report.json"


@pytest.mark.parametrize("case", ["folder", "below_file", "readonly"])
def test_check_mask_refuses_output_before_reading(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(check_mask, "load_masks", no_work)
    target = file_target(request, tmp_path, case)
    refused(capsys, check_mask.main, ["--checkpoint", "c", "--mask_path", "m", "--output", target], "--output")


@pytest.mark.parametrize("case", ["folder", "below_file", "readonly"])
def test_weight_sparsity_refuses_json_before_reading(request, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(weight_sparsity, "open_checkpoint", no_work)
    target = file_target(request, tmp_path, case)
    refused(capsys, weight_sparsity.main, ["--checkpoint", "m", "--json", target], "--json")


def test_refused_analysis_creates_no_output_folder(tmp_path, capsys):
    """The output folder is made when results are written, not while the flags are checked."""
    out = tmp_path / "new" / "out"
    refused(capsys, analyze.main, ["--base", tmp_path / "missing", "--tuned", tmp_path / "missing2",
                                   "--output_dir", out, "--device", "cpu", "--no_tqdm"], "missing")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("n_boot", ["0", "-3"])
def test_localize_refuses_n_boot_below_one(tmp_path, capsys, monkeypatch, n_boot):
    monkeypatch.setattr(localize, "find_step_checkpoints", no_work)
    refused(capsys, localize.main, ["--ckpt_dirs", "r1", "r2", "--bases", "m1", "m2", "--n_boot", n_boot,
                                    "--output_dir", tmp_path / "out", "--device", "cpu"], "--n_boot", n_boot)


@pytest.mark.parametrize("spec", ["3:2", "2-4", "0:4", "4:4", "2:x"])
def test_compute_masks_names_nm_for_a_bad_pattern(tmp_path, capsys, monkeypatch, spec):
    monkeypatch.setattr(models, "load_causal_lm", no_work)
    line = refused(capsys, compute_masks.main, ["--policy", "tiny-gpt2", "--method", "nm", "--nm", spec,
                                                "--output_dir", tmp_path / "masks"], f"--nm {spec}")
    assert "--sparsity" not in line


@pytest.mark.parametrize("dry_run", [False, True])
def test_malformed_yaml_matrix_names_file_and_line(tmp_path, capsys, monkeypatch, dry_run):
    monkeypatch.setattr("subnetscope.matrix.run_one", no_work)
    path = tmp_path / "sweep.yaml"
    path.write_text("base:\n  policy: tiny-gpt2\ngrid:\n  seed: [0, 1\n  lr: [1e-3]\n")
    line = refused(capsys, matrix_cli.main, ["--matrix", path, *(["--dry_run"] if dry_run else [])],
                   str(path), "not valid YAML", "line 5")
    assert "expected ',' or ']'" in line


def test_malformed_json_matrix_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text('{"grid": {"seed": [0, 1]},\n "base": {"policy": "tiny-gpt2",}}\n')
    refused(capsys, matrix_cli.main, ["--matrix", path, "--dry_run"], str(path), "not valid JSON", "line 2")


@pytest.mark.parametrize("where", ["flag", "file"])
def test_matrix_refuses_output_dir_before_running(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setattr("subnetscope.matrix.run_one", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    data = {"base": {"policy": "tiny-gpt2", "device": "cpu"}, "grid": {"seed": [0]}}
    if where == "file":
        data["output_dir"] = str(blocker)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    argv = ["--matrix", path, *(["--output_dir", blocker] if where == "flag" else [])]
    refused(capsys, matrix_cli.main, argv, "--output_dir" if where == "flag" else f"{path}: output_dir", str(blocker))
    assert blocker.read_text() == "x"


def test_matrix_exits_1_naming_the_failed_runs(tmp_path, capsys, monkeypatch):
    def fake_run(run, folder, detail=False):
        if run["axes"]["seed"] == 1:
            raise RuntimeError("planted failure")
        return {"changed_exact": 0.5, "changed_atol": 0.4, "changed_relative": 0.3, "gini_relative": 0.1,
                "eval_reward": 0.0, "final_step": 2}

    monkeypatch.setattr("subnetscope.matrix.run_one", fake_run)
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"base": {"policy": "tiny-gpt2", "device": "cpu", "lr": 1e-3},
                                "grid": {"seed": [0, 1, 2]}, "output_dir": str(tmp_path / "out")}))
    assert matrix_cli.main(["--matrix", str(path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "1 of 3 runs failed: rl-grpo__seed=1 " in err[0], err
    trace = (tmp_path / "out" / "runs" / "rl-grpo__seed=1.error.txt").read_text()
    assert trace.count("RuntimeError: planted failure") == 1
    monkeypatch.setattr("subnetscope.matrix.run_one", lambda run, folder, detail=False: fake_run(
        {"axes": {"seed": 0}}, folder))
    assert matrix_cli.main(["--matrix", str(path)]) == 0  # the retried run now succeeds


# Issue 18, one spelling per concept: a command, an old spelling of one of its flags, and the new spelling
OLD_SPELLINGS = [("sparse-ft", "--model", "--policy"), ("masks", "--model_path", "--policy"),
                 ("grpo", "--model", "--policy"), ("analyze", "--model", "--base"), ("spatial", "--model", "--base"),
                 ("localize", "--models", "--bases"), ("rank-vs-size", "--models", "--bases"),
                 ("weight-sparsity", "--model_dir", "--checkpoint")]


@pytest.mark.parametrize("command, old, new", OLD_SPELLINGS)
def test_an_old_spelling_is_one_line_naming_the_new_one(capsys, command, old, new):
    refused(capsys, app.main, [command, old, "x"], f"{old} is now {new}")


def test_an_old_yaml_key_is_one_line_naming_the_new_one(tmp_path, capsys):
    path = tmp_path / "settings.yaml"
    path.write_text("model: gpt2\n")
    refused(capsys, app.main, ["sparse-ft", "--config", path], f"{path}: model is now policy")


def parsers(name: str, parser: argparse.ArgumentParser):
    """A command's parser and its subcommands' parsers, each with the words that reach it."""
    yield [name], parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield [name, sub], child


def test_every_command_refuses_the_old_spellings_of_its_flags(capsys):
    """Every parser (subcommands' included) that has a new spelling refuses the old one, in its --x=value form
    too; compare keeps --models (the models it trains), so there it still parses."""
    refusals = 0
    for name, command in app.COMMANDS.items():
        for words, parser in parsers(name, importlib.import_module(command.module).build_parser()):
            flags = parser._option_string_actions
            for old, news in RENAMED.items():
                new = [n for n in news if n in flags]
                if new and old not in flags:
                    refused(capsys, app.main, [*words, f"{old}=x"], f"{old} is now {new[0]}")
                    refusals += 1
    assert refusals > len(OLD_SPELLINGS)
    assert compare.build_parser().parse_known_args(["--models", "a", "b"])[0].models == ["a", "b"]
