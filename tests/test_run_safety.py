"""A training run's data is safe: checks before the first byte, resume of finished, changed, damaged,
killed or foreign runs, temp + rename + fsync for every rewrite, and a full disk."""
import json
import os
import shutil
from pathlib import Path

import pytest

from subnetscope import rundir
from subnetscope.baselines import BaselineConfig, baseline_start
from subnetscope.changes import ChangeRules
from subnetscope.cli import grpo as grpo_cli
from subnetscope.cli import ppo as ppo_cli
from subnetscope.cli import sft as sft_cli
from subnetscope.errors import SubnetscopeError
from subnetscope.grpo import GRPOConfig, GRPOTrainer
from subnetscope.logger import MetricsLogger, check_wandb, read_metrics
from subnetscope.ppo import PPOConfig
from subnetscope.rl import RLConfig, RunConfig

from .conftest import tmpfs

TINY = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="fp32", batch_size=2,
            group_size=2, max_new_tokens=4, lr=1e-3, max_steps=1, save_every=1, eval_every=1, no_tqdm=True)
TINY_ARGS = ["--easy", "--policy", "tiny-gpt2", "--device", "cpu", "--precision", "fp32", "--batch_size", "2",
             "--max_new_tokens", "4", "--lr", "1e-3", "--max_steps", "1", "--save_every", "1", "--eval_every", "1",
             "--no_tqdm"]
GRPO_ARGS = [*TINY_ARGS, "--group_size", "2"]


def grpo_run(run: Path, **kw) -> GRPOTrainer:
    trainer = GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), **kw}))
    trainer.train()
    return trainer


def cli_error(main, argv: list[str], capsys) -> str:
    """Run a CLI in-process; it must exit 2 with exactly one `error:` line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1: a finished run, resumed or demoed again ----

def test_resume_of_a_finished_run_reports_it_and_trains_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    trainer = grpo_run(run)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    before = snapshot(run)
    capsys.readouterr()
    assert grpo_cli.main([*GRPO_ARGS, "--output_dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in trainer.params.values())
    assert "is finished (step 1" in out and f"of {total:,} weights" in out, out
    assert f"changed exact {last['changed/exact']:.2%}" in out and f"reward {last['reward/mean']:.3f}" in out
    assert snapshot(run) == before  # nothing trained, nothing rewritten


def test_a_resumed_finished_run_without_final_writes_it_only(tmp_path):
    run = tmp_path / "run"
    grpo_run(run)
    final = (run / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "final")
    steps = (run / "metrics.jsonl").read_text()
    resumed = GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), "resume": True}))
    metrics = resumed.train()
    assert resumed.start_step == 1 and metrics["step"] == 1 and "changed/exact" in metrics
    assert (run / "metrics.jsonl").read_text() == steps
    assert (run / "final" / "model.safetensors").read_bytes() == final  # the checkpoint's weights, untrained


@pytest.mark.slow
def test_demo_twice_reports_the_finished_runs_and_redoes_the_analyses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--demo", "--max_steps", "2", "--save_every", "1", "--output_dir", str(tmp_path / "demo"), "--no_tqdm"]
    assert grpo_cli.main(argv) == 0
    figures = tmp_path / "plots" / "demo"
    made = sorted(p.relative_to(figures) for p in figures.rglob("*.png"))
    assert made
    for png in figures.rglob("*.png"):
        png.unlink()
    capsys.readouterr()
    assert grpo_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("is finished (step 2") == 2, out
    assert sorted(p.relative_to(figures) for p in figures.rglob("*.png")) == made


# ---- 2: --wandb without a login ----

@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_CONFIG_DIR", "NETRC", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    wandb.teardown()  # wandb caches its settings per process
    yield home
    wandb.teardown()


def test_wandb_without_login_is_one_line_before_anything_is_written(tmp_path, no_wandb_login, capsys):
    with pytest.raises(SubnetscopeError, match="wandb login"):
        check_wandb("proj")
    run = tmp_path / "run"
    line = cli_error(grpo_cli.main, [*GRPO_ARGS, "--output_dir", run, "--wandb", "proj"], capsys)
    assert "--wandb proj" in line and "wandb login" in line and "WANDB_MODE=offline" in line
    assert not run.exists()
    line = cli_error(sft_cli.main, ["--output_dir", tmp_path / "sft", "--wandb", "proj"], capsys)
    assert "wandb login" in line and not (tmp_path / "sft").exists()


@pytest.mark.parametrize("env", [{"WANDB_MODE": "offline"}, {"WANDB_MODE": "disabled"}, {"WANDB_API_KEY": "x" * 40}])
def test_wandb_offline_or_with_a_key_passes_the_check(no_wandb_login, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check_wandb("proj")
    check_wandb(None)


# ---- 3: temp + rename + fsync ----

def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3)))
    before, inode = path.read_text(), path.stat().st_ino

    def killed(fd):
        raise KeyboardInterrupt  # the process dies with the new copy written but not yet renamed

    monkeypatch.setattr(rundir.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, None, {}, resume_step=1)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    monkeypatch.undo()
    MetricsLogger(tmp_path, None, {}, resume_step=1)
    assert read_metrics(path) == [{"step": 1, "x": 1}] and path.stat().st_ino != inode  # a new file, renamed in


def test_checkpoints_and_run_config_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = rundir.fsync_path
    monkeypatch.setattr(rundir, "fsync_path", lambda p: (synced.append(Path(p)), real(p)))
    run = tmp_path / "run"
    grpo_run(run)
    for folder in ("base", "step_1", "final"):
        names = {p.name for p in (run / folder).iterdir()}
        done = {p.name for p in synced if p.parent.name.startswith(f".{folder}.")}  # inside the temporary folder
        assert names <= done, (folder, names - done)
    assert any(p.name.startswith(".run_config.json.") for p in synced)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


# ---- 4: --resume with other settings ----

def test_resume_with_other_settings_is_refused_naming_each(tmp_path, capsys):
    run = tmp_path / "run"
    grpo_run(run)
    config = (run / "run_config.json").read_text()
    line = cli_error(grpo_cli.main, [*GRPO_ARGS, "--group_size", "4", "--lr", "1e-4", "--seed", "3",
                                     "--output_dir", run, "--resume", "--max_steps", "2"], capsys)
    assert f"--lr {1e-4} (run has {1e-3})" in line and "--group_size 4 (run has 2)" in line
    assert "--seed 3 (run has 0)" in line and "--allow_changed_settings" in line
    assert "max_steps" not in line and "save_every" not in line
    assert (run / "run_config.json").read_text() == config and not (run / "step_2").exists()


def test_allowed_setting_changes_are_recorded(tmp_path):
    run = tmp_path / "run"
    grpo_run(run)
    resumed = grpo_run(run, lr=1e-4, max_steps=2, save_every=2, resume=True, allow_changed_settings=True)
    assert resumed.start_step == 1 and (run / "step_2").is_dir()
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["settings"]["lr"] == 1e-4 and saved["settings"]["max_steps"] == 2
    assert saved["setting_changes"] == [{"step": 1, "setting": "lr", "old": 1e-3, "new": 1e-4}]
    assert saved["algorithm"] == "GRPO"


def test_run_control_settings_may_change_on_resume(tmp_path):
    run = tmp_path / "run"
    grpo_run(run)
    resumed = grpo_run(run, max_steps=2, save_every=2, eval_every=2, resume=True, log_localization=False)
    assert resumed.start_step == 1 and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert "setting_changes" not in json.loads((run / "run_config.json").read_text())


def test_resume_where_auto_precision_resolves_otherwise_is_refused(tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    trainer = grpo_run(run, precision="auto")
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["settings"]["precision_used"] == "fp32" and saved["settings"]["view_dtype_used"] == "float32"
    saved["settings"].update(precision_used="mixed", view_dtype_used="bfloat16")  # as auto resolves on a GPU,
    (run / "run_config.json").write_text(json.dumps(saved))
    masters = {n: p.detach().clone() for n, p in trainer.params.items()}  # which keeps fp32 masters in step_N
    save_file(masters, str(run / "step_1" / "master.safetensors"))
    refusal = r"trained in mixed precision \(judged at bfloat16\); --precision auto on cpu gives fp32 precision"
    with pytest.raises(SubnetscopeError, match=refusal):
        GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), "precision": "auto", "max_steps": 2, "resume": True}))
    assert not (run / "step_2").exists()
    resumed = grpo_run(run, precision="auto", max_steps=2, resume=True, allow_changed_settings=True)
    assert resumed.start_step == 1 and (run / "step_2").is_dir()
    changes = json.loads((run / "run_config.json").read_text())["setting_changes"]
    assert {(c["setting"], c["old"], c["new"]) for c in changes} == {("precision_used", "mixed", "fp32"),
                                                                      ("view_dtype_used", "bfloat16", "float32")}


def test_resume_with_another_precision_or_view_is_refused_before_any_write(tmp_path):
    run = tmp_path / "run"
    grpo_run(run)
    before = snapshot(run)
    for change, flag in (({"precision": "mixed"}, r"--precision mixed \(run has fp32\)"),
                         ({"view_dtype": "bfloat16"}, r"--view_dtype bfloat16 \(run has none\)")):
        with pytest.raises(SubnetscopeError, match=flag):
            GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), "max_steps": 2, "resume": True, **change}))
    assert snapshot(run) == before


def test_sft_resume_with_other_settings_or_task_is_refused(tmp_path):
    from dataclasses import asdict

    run = tmp_path / "sft"
    (run / "checkpoint-2").mkdir(parents=True)
    settings = asdict(BaselineConfig(output_dir=str(run), lr=1e-5))
    (run / "run_config.json").write_text(json.dumps({"algorithm": "SFT", "settings": settings}))
    with pytest.raises(SubnetscopeError, match=r"--lr 0.0001 \(run has 1e-05\)"):
        baseline_start(BaselineConfig(output_dir=str(run), lr=1e-4, resume=True))
    with pytest.raises(SubnetscopeError, match="holds a SFT run, not a DPO run"):
        baseline_start(BaselineConfig(output_dir=str(run), task="dpo", resume=True))
    assert baseline_start(BaselineConfig(output_dir=str(run), lr=1e-4, resume=True, allow_changed_settings=True))


@pytest.mark.slow
def test_sft_resume_of_a_finished_run_trains_nothing(tmp_path, capsys):
    from subnetscope.baselines import train_baseline

    run = tmp_path / "sft"
    cfg = dict(reward="easy", dataset="easy", device="cpu", max_new_tokens=4, max_steps=1, save_every=1,
               max_prompts=4, output_dir=str(run))
    train_baseline(BaselineConfig(**cfg))
    before = snapshot(run)
    capsys.readouterr()
    assert sft_cli.main(["--reward", "easy", "--dataset", "easy", "--device", "cpu", "--max_new_tokens", "4",
                         "--max_steps", "1", "--save_every", "1", "--max_prompts", "4", "--output_dir", str(run),
                         "--resume"]) == 0
    out = capsys.readouterr().out
    assert "is finished (step 1" in out and "changed exact" in out, out
    assert snapshot(run) == before


# ---- 5: every check before the first byte ----

def write_text_file(tmp_path: Path) -> Path:
    path = tmp_path / "not_a_mask.safetensors"
    path.write_text("hello")
    return path


GRPO_CASES = {
    "missing_mask": (lambda t: ["--update_mask", t / "nope.safetensors"], "--update_mask"),
    "not_a_mask": (lambda t: ["--update_mask", write_text_file(t)], "not_a_mask.safetensors"),
    "max_new_tokens": (lambda t: ["--max_new_tokens", "0"], "--max_new_tokens"),
    "max_prompt_tokens": (lambda t: ["--max_prompt_tokens", "0"], "--max_prompt_tokens"),
    "weight_decay": (lambda t: ["--weight_decay", "-1"], "--weight_decay"),
    "atol": (lambda t: ["--atol", "-1"], "--atol"),
    "eta": (lambda t: ["--eta", "nan"], "--eta"),
    "topk": (lambda t: ["--topk", "0"], "--topk"),
    "view_dtype": (lambda t: ["--precision", "bf16", "--view_dtype", "float32"], "--view_dtype"),
}


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_bad_input_writes_nothing(tmp_path, capsys, case):
    extra, flag = GRPO_CASES[case]
    run = tmp_path / "run"
    line = cli_error(grpo_cli.main, [*GRPO_ARGS, *extra(tmp_path), "--output_dir", run], capsys)
    assert flag in line and not run.exists(), line


def test_output_dir_that_is_a_file_or_below_one(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for main, argv in ((grpo_cli.main, GRPO_ARGS), (ppo_cli.main, TINY_ARGS), (sft_cli.main, [])):
        for out in (afile, afile / "run"):
            line = cli_error(main, [*argv, "--output_dir", out], capsys)
            assert "--output_dir" in line and str(afile) in line
    assert afile.read_text() == "x"


def test_output_dir_on_a_read_only_mount(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for main, argv in ((grpo_cli.main, GRPO_ARGS), (ppo_cli.main, TINY_ARGS), (sft_cli.main, [])):
            line = cli_error(main, [*argv, "--output_dir", ro / "run"], capsys)
            assert "--output_dir" in line and "cannot write" in line
        assert not list(ro.iterdir())


@pytest.mark.parametrize("argv,flag", [(["--max_new_tokens", "0"], "--max_new_tokens"),
                                       (["--weight_decay", "-1"], "--weight_decay"),
                                       (["--batch_size", "6", "--mini_batch_size", "4"], "--mini_batch_size")])
def test_ppo_bad_input_writes_nothing(tmp_path, capsys, argv, flag):
    run = tmp_path / "run"
    line = cli_error(ppo_cli.main, [*TINY_ARGS, *argv, "--output_dir", run], capsys)
    assert flag in line and not run.exists(), line


@pytest.mark.parametrize("task", ["sft", "dpo"])
@pytest.mark.parametrize("argv,flag", [(["--max_new_tokens", "0"], "--max_new_tokens"),
                                       (["--max_prompt_tokens", "0"], "--max_prompt_tokens"),
                                       (["--atol", "-1"], "--atol"), (["--eta", "inf"], "--eta")])
def test_sft_and_dpo_bad_input_writes_nothing(tmp_path, capsys, task, argv, flag):
    run = tmp_path / "run"
    line = cli_error(sft_cli.main, ["--task", task, *argv, "--output_dir", run], capsys)
    assert flag in line and not run.exists(), line


def test_the_corrected_rerun_is_not_refused(tmp_path, capsys):
    run = tmp_path / "run"
    cli_error(grpo_cli.main, [*GRPO_ARGS, "--update_mask", tmp_path / "nope", "--output_dir", run], capsys)
    assert grpo_cli.main([*GRPO_ARGS, "--output_dir", str(run)]) == 0
    assert (run / "final").is_dir()


# ---- 6: the wrong algorithm ----

def test_resume_with_another_algorithm_is_one_line(tmp_path, capsys):
    grpo = tmp_path / "grpo"
    grpo_run(grpo)
    line = cli_error(ppo_cli.main, [*TINY_ARGS, "--output_dir", grpo, "--resume"], capsys)
    assert "holds a GRPO run, not a PPO run" in line and "main_grpo.py --resume" in line
    line = cli_error(ppo_cli.main, [*TINY_ARGS, "--output_dir", grpo], capsys)  # without --resume, too
    assert "holds a GRPO run" in line
    with pytest.raises(SubnetscopeError, match="holds a GRPO run, not a SFT run"):
        baseline_start(BaselineConfig(output_dir=str(grpo), resume=True))

    ppo = tmp_path / "ppo"  # a PPO run from before run_config.json named its algorithm
    ppo.mkdir()
    (ppo / "run_config.json").write_text(json.dumps({"settings": {"ppo_epochs": 4}, "parameters": {}}))
    line = cli_error(grpo_cli.main, [*GRPO_ARGS, "--output_dir", ppo, "--resume"], capsys)
    assert "holds a PPO run, not a GRPO run" in line and "main_ppo.py" in line

    sft = tmp_path / "sft"  # a TRL run folder as main_sft.py wrote it before run_config.json
    (sft / "checkpoint-2").mkdir(parents=True)
    (sft / "subnet_metrics.jsonl").write_text("")
    line = cli_error(grpo_cli.main, [*GRPO_ARGS, "--output_dir", sft, "--resume"], capsys)
    assert "holds a SFT/DPO run, not a GRPO run" in line and "main_sft.py" in line
    assert sorted(p.name for p in sft.iterdir()) == ["checkpoint-2", "subnet_metrics.jsonl"]


# ---- 7: what killed checkpoint writes left ----

def test_killed_writes_leftovers_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    grpo_run(run)
    left = [run / ".step_2.k3j4x9", run / ".step_1.old", run / ".base.abc123"]
    for folder in left:
        folder.mkdir()
        (folder / "subnet.safetensors").write_bytes(b"half")
    (run / ".run_config.json.4242.tmp").write_text("{")
    (run / ".keep").write_text("mine")
    resumed = grpo_run(run, max_steps=2, resume=True)
    assert resumed.start_step == 1 and (run / "step_2" / "subnet.safetensors").is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".keep"]


# ---- 8: a full disk ----

def test_disk_full_at_a_checkpoint_names_folder_and_bytes(tmp_path):
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        run = disk / "run"
        grpo_run(run)
        step1 = snapshot(run / "step_1")
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - (96 << 10)))
        with pytest.raises(SubnetscopeError) as err:
            grpo_run(run, max_steps=2, save_every=1, resume=True)
        message = str(err.value)
        assert f"{run / 'step_2'}" in message and "needs about" in message and "step_1" in message, message
        need = float(message.split("needs about ")[1].split(" KB")[0]) * 1024
        written = sum(len(b) for b in step1.values())
        assert 0.8 * written < need < 1.5 * written + 100_000  # the estimate is about what a step writes
        assert snapshot(run / "step_1") == step1
        assert not [p for p in run.iterdir() if p.name.startswith(".step_")]


def test_disk_full_during_a_write_keeps_the_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "step_3"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"old")

    def write(tmp: Path) -> None:
        (tmp / "w.bin").write_bytes(b"new")
        raise OSError(28, "No space left on device")

    with pytest.raises(SubnetscopeError, match=r"no space left on the disk for .*step_3: it needs about 1\.0 KB"):
        rundir.write_dir_checked(folder, write, 1024)
    assert (folder / "w.bin").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]


# ---- 9: damaged run state ----

def test_damaged_run_config_is_one_line_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    grpo_run(run)
    text = (run / "run_config.json").read_text()
    for damaged in (text[: len(text) // 2], "[1, 2]"):
        (run / "run_config.json").write_text(damaged)
        line = cli_error(grpo_cli.main, [*GRPO_ARGS, "--output_dir", run, "--resume", "--max_steps", "2"], capsys)
        assert str(run / "run_config.json") in line and "damaged" in line


def test_a_half_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    grpo_run(run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "reward/me')
    capsys.readouterr()
    grpo_run(run, max_steps=2, resume=True)
    assert "dropped its last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def test_a_damaged_metrics_line_elsewhere_is_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nxx\n{"step": 2}\n')
    with pytest.raises(SubnetscopeError, match=r"metrics.jsonl line 2 is not a JSON record"):
        read_metrics(path)


@pytest.mark.parametrize("lost", ["subnet.safetensors", "trainer_state.pt"])
def test_a_step_without_weights_or_state_resumes_from_the_one_before(tmp_path, capsys, lost):
    run = tmp_path / "run"
    grpo_run(run, max_steps=2)
    (run / "step_2" / lost).unlink()
    capsys.readouterr()
    resumed = GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), "max_steps": 3, "resume": True}))
    out = capsys.readouterr().out
    assert resumed.start_step == 1 and "step_2" in out and "resuming back to step_1" in out, out
    resumed.train()
    assert (run / "step_2" / lost).is_file() and (run / "step_3").is_dir()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_truncated_trainer_state_is_one_line_naming_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    grpo_run(run)
    state = run / "step_1" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    line = cli_error(grpo_cli.main, [*GRPO_ARGS, "--output_dir", run, "--resume", "--max_steps", "2"], capsys)
    assert str(state) in line and "delete that folder" in line


# ---- 10: one atol everywhere ----

def test_change_rule_defaults_agree_everywhere():
    import argparse

    from subnetscope.cli.common import add_rule_args

    parser = argparse.ArgumentParser()
    add_rule_args(parser)
    analysis = parser.parse_args([])
    rules = ChangeRules()
    for cls in (RunConfig, RLConfig, GRPOConfig, PPOConfig, BaselineConfig):
        assert (cls().atol, cls().eta) == (rules.atol, rules.eta) == (analysis.atol, analysis.eta) == (1e-5, 1e-3), cls
