"""Gradual magnitude pruning: the schedule, the pruning itself, revival and the structure metrics,
each against hand-computed values, then main_prune.py, weight_sparsity.py and prune_report.py."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetscope.errors import SubnetscopeError
from subnetscope.metrics import effective_rank
from subnetscope.prune_trainer import PruneConfig, PruneTrainer
from subnetscope.pruning import (
    PruneSchedule,
    dead_rows_cols,
    magnitude_prune_,
    revival_rate,
    slope,
    structure_metrics,
    zeroed_grad_norms,
)

from .conftest import SHAKESPEARE, SIDE_BY_SIDE, TINY_GPT2_DIR, at_once, kill_when_exists

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = TINY_GPT2_DIR


def test_schedule_steps_and_levels_by_hand():
    s = PruneSchedule(0.5, 100, 0.15, 0.85, 10, "linear")
    s.validate()
    assert s.application_steps() == [22, 29, 36, 43, 50, 57, 64, 71, 78, 85]
    assert [round(s.level(i), 10) for i in (1, 5, 10)] == [0.05, 0.25, 0.5]
    cubic = PruneSchedule(0.5, 100, 0.15, 0.85, 10, "cubic")
    assert cubic.level(5) == pytest.approx(0.5 * (1 - 0.5**3)) and cubic.level(10) == pytest.approx(0.5)


@pytest.mark.parametrize("args, message", [
    ((1.0, 100, 0.15, 0.85, 10), "must be in [0, 1)"),
    ((0.5, 100, 0.9, 0.5, 10), "leave no pruning window"),
    ((0.5, 10, 0.15, 0.85, 10), "too few for 10 prune_applications"),
])
def test_schedule_rejects_bad_settings(args, message):
    with pytest.raises(SubnetscopeError, match=message.replace("[", r"\[").replace(")", r"\)")):
        PruneSchedule(*args).validate()


def test_phases_of_the_schedule():
    s = PruneSchedule(0.5, 100, 0.15, 0.85, 10)  # prunings at 22, 29, ..., 85
    assert [s.phase(t) for t in (1, 21, 22, 50, 85, 86, 100)] == [
        "warmup", "warmup", "pruning", "pruning", "pruning", "finalization", "finalization"]


def test_per_matrix_sparsity_and_zeroed_gradient_norms_by_hand():
    a = torch.tensor([[0.0, 1.0], [0.0, 2.0]], requires_grad=True)
    b = torch.tensor([[3.0, 0.0, 4.0]], requires_grad=True)
    a.grad, b.grad = torch.tensor([[3.0, 9.0], [4.0, 9.0]]), torch.tensor([[9.0, 2.0, 9.0]])
    weights = {"h.0.attn.c_attn.weight": a, "h.1.mlp.c_fc.weight": b}
    metrics = structure_metrics(weights, with_rank=False)
    assert metrics["layer_sparsity/h.0.attn.c_attn.weight"] == 0.5
    assert metrics["layer_sparsity/h.1.mlp.c_fc.weight"] == pytest.approx(1 / 3)
    assert metrics["sparsity/overall"] == pytest.approx(3 / 7)
    masks = {n: w == 0 for n, w in weights.items()}
    total, per_tensor = zeroed_grad_norms(weights, masks)
    assert per_tensor == {"h.0.attn.c_attn.weight": pytest.approx(5.0), "h.1.mlp.c_fc.weight": pytest.approx(2.0)}
    assert total == pytest.approx(29 ** 0.5)


def test_magnitude_prune_zeroes_exactly_the_smallest():
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.7, 0.2, -0.05]])
    masks = magnitude_prune_({"w": w}, 0.5)
    assert torch.equal(w, torch.tensor([[0.5, 0.0, 0.3], [-0.7, 0.0, 0.0]]))
    assert masks["w"].sum() == 3


def test_revival_rate_and_structure_by_hand():
    w = torch.zeros(2, 2)
    masks = {"w": torch.ones(2, 2, dtype=torch.bool)}
    w[0, 1] = 0.3
    assert revival_rate({"w": w}, masks) == 0.25
    assert revival_rate({"w": w}, {"w": torch.zeros(2, 2, dtype=torch.bool)}) is None
    assert dead_rows_cols(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])) == (1, 2)
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.arange(1.0, 5.0))) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    assert slope([0, 10, 20], [0.1, 0.2, 0.3]) == pytest.approx(0.01)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(SHAKESPEARE.read_text()[:12000])
    return path


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(SHAKESPEARE.read_text()[:6000])
    return path


def tiny_trainer(text, out, **settings) -> PruneTrainer:
    """A one-block GPT-2 on 6,000 characters (1,521 training tokens), one epoch of 23 steps."""
    return PruneTrainer(PruneConfig(data=str(text), tokenizer=str(TOKENIZER), n_layer=1, n_head=2, n_embd=32,
                                    block_size=16, batch_size=4, epochs=1, prune_applications=4, log_every=3,
                                    eval_every=1000, eval_batches=1, save_every=1000, rank_metrics=False,
                                    device="cpu", no_tqdm=True, output_dir=str(out), **settings))


LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def counted_sparsity(run) -> tuple[int, int]:
    """Zeros and entries of the linear weights in final/model.safetensors, counted from the file."""
    weights = load_file(str(run / "final" / "model.safetensors"))
    linear = [w for n, w in weights.items() if n.endswith(LINEAR)]
    assert len(linear) == 4  # one block: c_attn, attn c_proj, c_fc, mlp c_proj
    return sum(int((w == 0).sum()) for w in linear), sum(w.numel() for w in linear)


@pytest.fixture(scope="module")
def half_run(tiny_text, tmp_path_factory):
    """A tiny run pruned to 50% with the default settings: (trainer, its result, its folder)."""
    out = tmp_path_factory.mktemp("half") / "run"
    trainer = tiny_trainer(tiny_text, out, target_sparsity=0.5)
    return trainer, trainer.train(), out


def test_a_run_pruned_to_half_ends_at_half(half_run):
    """The mask is held through the finalization phase, so the final model is 50% sparse (zeros
    counted in the saved file), while revival is still measured between the prunings."""
    trainer, result, run = half_run
    plan = sorted(trainer.plan)
    # window 0.15·23 = 3.45 … 0.85·23 = 19.55 in 4 intervals of 4.025: 7.475, 11.5, 15.525, 19.55
    assert trainer.total_steps == 23 and plan == [7, 12, 16, 20]
    assert trainer.phases() == {"warmup": [1, 6], "pruning": [7, 20], "finalization": [21, 23],
                                "mask_held_from": 21}
    assert json.loads((run / "config.json").read_text())["phases"]["mask_held_from"] == 21
    zeros, total = counted_sparsity(run)
    expected = sum(round(0.5 * w.numel()) for w in trainer.weights.values())  # round(level·n) smallest per matrix
    assert zeros == expected and zeros / total == pytest.approx(0.5, abs=1e-3)
    assert result["sparsity/overall"] == zeros / total
    recs = records(run)
    between = [r for r in recs if plan[0] < r["step"] < plan[-1] and r["step"] not in plan]
    assert between and all(r["weight_revival/revival_rate"] > 0 and not r["pruning/mask_held"] for r in between)
    final_phase = [r for r in recs if r["step"] > plan[-1]]
    assert final_phase and all(r["weight_revival/revival_rate"] == 0.0 and r["pruning/mask_held"] for r in final_phase)


@pytest.mark.slow
def test_without_hold_final_the_pruned_weights_revive(tiny_text, tmp_path):
    """--no-hold_final, the old default: AdamW revives the pruned weights and "50%" ends almost dense."""
    trainer = tiny_trainer(tiny_text, tmp_path / "run", target_sparsity=0.5, hold_final=False)
    assert trainer.phases()["mask_held_from"] is None
    trainer.train()
    zeros, total = counted_sparsity(tmp_path / "run")
    assert zeros < 0.01 * total
    assert records(tmp_path / "run")[-1]["weight_revival/revival_rate"] > 0.99


def test_records_carry_the_readme_metric_names(half_run):
    trainer, _, run = half_run
    recs = records(run)
    last = recs[-1]
    names = list(trainer.weights)
    assert {f"layer_sparsity/{n}" for n in names} <= set(last)
    assert {f"zero_grad_norm/{n}" for n in names} <= set(last)
    assert {"trends/avg_revival_rate", "trends/sparsity_slope"} <= set(last)
    for n, w in trainer.weights.items():  # the final weights, counted again
        assert last[f"layer_sparsity/{n}"] == pytest.approx(float((w == 0).float().mean()), abs=1e-12)
    intervals = [r["weight_revival/interval_rate"] for r in recs if r.get("weight_revival/interval_rate") is not None]
    assert len(intervals) == 3 and last["trends/avg_revival_rate"] == pytest.approx(sum(intervals) / len(intervals))
    squares = sum(last[f"zero_grad_norm/{n}"] ** 2 for n in names)
    assert last["pruning/grad_norm_zeroed"] == pytest.approx(squares ** 0.5) and squares > 0


def prune_args(text, out, *extra):
    return ["--data", str(text), "--tokenizer", str(TOKENIZER), "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--block_size", "16", "--batch_size", "4", "--epochs", "2", "--prune_applications", "4",
            "--log_every", "5", "--eval_every", "20", "--save_every", "10", "--device", "cpu", "--no_tqdm",
            "--output_dir", str(out), *extra]


def run_prune(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "main_prune.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


# Two identical CPU runs of this model with two threads differ in the last bits about one time in
# six (measured: never within one process, never with one thread), so the bit-for-bit resume test
# runs its processes on one thread: what it checks is the restored state, not the platform. Runs side
# by side get one thread each as well (conftest.SIDE_BY_SIDE).
ONE_THREAD = {**os.environ, **SIDE_BY_SIDE}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def linear_shapes(run):
    weights = load_file(str(run / "final" / "model.safetensors"))
    return [w.numel() for n, w in weights.items() if w.dim() == 2 and "wte" not in n and "wpe" not in n]


@pytest.fixture(scope="module")
def runs_at_60(short_text, tmp_path_factory) -> dict[bool, Path]:
    """Runs pruned to 60% without and with --hard_mask (side by side), by --hard_mask."""
    out = tmp_path_factory.mktemp("at_60")
    results = at_once(*(lambda hard=hard: run_prune(*prune_args(short_text, out / str(hard), "--target_sparsity", "0.6",
                                                               *(["--hard_mask"] if hard else [])), env=ONE_THREAD)
                        for hard in (False, True)))
    for result in results:
        assert result.returncode == 0, result.stderr
    return {hard: out / str(hard) for hard in (False, True)}


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.slow
def test_applied_sparsity_follows_the_schedule_exactly(runs_at_60, tmp_path, hard):
    run = runs_at_60[hard]
    config = json.loads((run / "config.json").read_text())
    plan = {int(k): v for k, v in config["prune_plan"].items()}
    schedule = PruneSchedule(0.6, config["total_steps"], 0.15, 0.85, 4)
    assert plan == schedule.plan() and len(plan) == 4
    sizes = linear_shapes(run)
    by_step = {r["step"]: r for r in records(run)}
    for step, level in plan.items():
        expected = sum(round(level * n) for n in sizes) / sum(sizes)
        assert by_step[step]["sparsity/overall"] == pytest.approx(expected, abs=1e-12)
        assert by_step[step]["pruning/sparsity"] == level
    last = records(run)[-1]
    if hard:  # pruned weights stay zero: nothing revives and the final model is exactly sparse
        assert all(r["weight_revival/revival_rate"] in (None, 0.0) for r in records(run))
        assert last["sparsity/overall"] == pytest.approx(sum(round(0.6 * n) for n in sizes) / sum(sizes), abs=1e-12)
        check = subprocess.run([sys.executable, str(ROOT / "weight_sparsity.py"), "--checkpoint", str(run / "final"),
                                "--json", str(tmp_path / "s.json")], capture_output=True, text=True, cwd=ROOT)
        assert check.returncode == 0, check.stderr
        assert json.loads((tmp_path / "s.json").read_text())["overall_sparsity"] == pytest.approx(
            last["sparsity/overall"])
    else:  # AdamW's momentum moves zeroed weights off zero at the next step; after the last pruning the mask holds
        after = [r for r in records(run) if min(plan) < r["step"] < max(plan) and r["step"] not in plan]
        assert after and all(0.0 < r["weight_revival/revival_rate"] <= 1.0 for r in after)
        assert last["weight_revival/revival_rate"] == 0.0
        assert last["sparsity/overall"] == pytest.approx(sum(round(0.6 * n) for n in sizes) / sum(sizes), abs=1e-12)


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(short_text, tmp_path):
    killed = tmp_path / "killed"

    def killed_then_resumed():
        kill_when_exists([str(ROOT / "main_prune.py"), *prune_args(short_text, killed, "--target_sparsity", "0.5")],
                         ROOT, killed / "checkpoint-30", env=ONE_THREAD)
        assert not (killed / "final").exists(), "the run finished before it could be killed"
        return run_prune(*prune_args(short_text, killed, "--target_sparsity", "0.5", "--resume"), env=ONE_THREAD)

    full, resumed = at_once(lambda: run_prune(*prune_args(short_text, tmp_path / "full", "--target_sparsity", "0.5"),
                                              env=ONE_THREAD), killed_then_resumed)
    assert full.returncode == 0, full.stderr
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_recs, resumed_recs = records(tmp_path / "full"), records(killed)
    assert [r["step"] for r in resumed_recs] == [r["step"] for r in full_recs]
    assert ([(r["step"], r["pruning/sparsity"]) for r in resumed_recs]
            == [(r["step"], r["pruning/sparsity"]) for r in full_recs])
    assert resumed_recs[-1]["val/loss"] == pytest.approx(full_recs[-1]["val/loss"], abs=0.05)


@pytest.mark.slow
def test_prune_report_tables_match_the_metrics(short_text, tmp_path):
    levels = ("0.0", "0.5")
    results = at_once(*(lambda level=level: run_prune(*prune_args(short_text, tmp_path / "runs" / level,
                                                                 "--target_sparsity", level), env=ONE_THREAD)
                        for level in levels))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "prune_report.py"), "--results_dir", str(tmp_path / "runs"),
                             "--output_dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    with open(out / "summary.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    for level in ("0.0", "0.5"):
        recs = records(tmp_path / "runs" / level)
        assert float(rows[level]["final_val_loss"]) == pytest.approx(
            [r["val/loss"] for r in recs if r.get("val/loss")][-1])
        assert float(rows[level]["target_sparsity"]) == float(level)
    for png in ("loss_vs_sparsity.png", "revival_over_time.png", "dead_neurons_per_layer.png",
                "effective_rank_per_layer.png"):
        assert (out / png).stat().st_size > 1000 and (out / png.replace(".png", ".csv")).exists()


BAD_INPUT_CASES = ["unknown_key", "target", "window", "short"]


@pytest.fixture(scope="module")
def bad_input_runs(short_text, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each case's main_prune.py, all at once: its result and its folder."""
    tmp = tmp_path_factory.mktemp("bad_input")
    config = tmp / "c.yaml"
    config.write_text("target_sparsity: 0.5\nlearning_rate: 0.1\n")
    tiny = tmp / "tiny.txt"
    tiny.write_text("To be, or not to be.")
    extras = {"unknown_key": ["--config", str(config)], "target": ["--target_sparsity", "1.0"],
              "window": ["--warmup_ratio", "0.9", "--final_prune_ratio", "0.5"], "short": ["--data", str(tiny)]}
    results = at_once(*(lambda case=case: run_prune(*prune_args(short_text, tmp / case, *extras[case]))
                        for case in BAD_INPUT_CASES))
    return {case: (result, tmp / case) for case, result in zip(BAD_INPUT_CASES, results)}


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
@pytest.mark.slow
def test_bad_input_exits_2_before_training(bad_input_runs, case):
    result, run = bad_input_runs[case]
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert not (run / "metrics.jsonl").exists()
    if case == "unknown_key":
        assert "learning_rate" in lines[0]


@pytest.mark.slow
def test_help_explains_every_setting():
    result = subprocess.run([sys.executable, str(ROOT / "main_prune.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert all(f"--{f.name}" in result.stdout for f in fields(PruneConfig))
