"""The run matrix: validation before running, a small sweep, a failed run, resume and aggregation."""
import csv
import json

import pytest
import torch

from subnetscope import matrix
from subnetscope.errors import SubnetscopeError
from subnetscope.matrix import expand, run_matrix

from .conftest import save_state


def write(tmp_path, data) -> str:
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps(data))
    return str(path)


BASE = {"policy": "tiny-gpt2", "dataset": "easy", "reward": "easy", "device": "cpu", "max_steps": 2,
        "save_every": 2, "max_new_tokens": 6, "batch_size": 4}


@pytest.mark.parametrize("data, message", [
    ({"grid": {"task": ["rl-grpo"]}, "colour": 1}, "unknown top-level key"),
    ({"base": {"learning_rate": 1e-3}}, "'learning_rate' is not a setting of rl-grpo runs"),
    ({"grid": {"task": ["rl-ppo"], "lr": ["fast"]}}, "lr='fast' is not a valid value for rl-ppo runs"),
    ({"grid": {"task": ["sft"]}, "base": {"group_size": 4}}, "'group_size' is not a setting of sft runs"),
    ({"grid": {"task": ["rl-trpo"]}}, "unknown task 'rl-trpo'"),
    ({"grid": {"task": ["rl-grpo"], "optimizer": ["adam"]}}, "--optimizer 'adam'"),
    ({"base": {"dtype": "bfloat16"}}, "'dtype' was replaced by precision"),
    ({"grid": {"task": ["rl-ppo"], "precision": ["half"]}}, "--precision 'half'"),
    ({"grid": {"task": ["rl-grpo"]}, "base": {"view_dtype": "bf16"}}, "--view_dtype 'bf16'"),
])
def test_bad_matrix_is_rejected_before_anything_runs(tmp_path, data, message):
    with pytest.raises(SubnetscopeError, match=message):
        expand(json.loads(open(write(tmp_path, data)).read()))


def test_grid_expands_every_combination_with_task_settings(tmp_path):
    runs = expand({"base": BASE, "grid": {"task": ["rl-grpo", "sft"], "seed": [0, 1], "lr": [1e-3, 3e-3]},
                   "per_task": {"rl-grpo": {"group_size": 2}}})
    assert len(runs) == 8
    grpo = [r for r in runs if r["task"] == "rl-grpo"]
    assert all(r["settings"]["group_size"] == 2 for r in grpo)
    assert all("group_size" not in r["settings"] for r in runs if r["task"] == "sft")


def test_precision_and_view_dtype_are_run_settings(tmp_path):
    runs = expand({"base": {**BASE, "view_dtype": "bfloat16"},
                   "grid": {"task": ["rl-grpo", "rl-ppo"], "precision": ["mixed", "fp32"]}})
    assert sorted((r["task"], r["settings"]["precision"]) for r in runs) == [
        ("rl-grpo", "fp32"), ("rl-grpo", "mixed"), ("rl-ppo", "fp32"), ("rl-ppo", "mixed")]
    assert all(r["settings"]["view_dtype"] == "bfloat16" for r in runs)
    assert sorted(r["name"] for r in runs if r["settings"]["precision"] == "mixed") == [
        "rl-grpo__precision=mixed", "rl-ppo__precision=mixed"]


def _fp32_run(folder, recorded: str | None) -> None:
    """A run folder of float32 checkpoints: 5 entries moved by four bf16 steps, 9 by a quarter of one
    (a change only float32 sees); run_config.json records `recorded` as the view."""
    base = torch.linspace(0.5, 0.9, 64).bfloat16().float()  # bf16 values: their rounding is themselves
    tuned = base.clone()
    tuned[:5] *= 1 + 2 ** -5
    tuned[10:19] += base[10:19] * 2 ** -10
    save_state(folder / "base", {"transformer.h.0.mlp.c_fc.weight": base.view(8, 8)})
    save_state(folder / "step_3", {"transformer.h.0.mlp.c_fc.weight": tuned.view(8, 8)})
    settings = {"policy": "p"} if recorded is None else {"policy": "p", "view_dtype_used": recorded}
    (folder / "run_config.json").write_text(json.dumps({"algorithm": "GRPO", "settings": settings}))


@pytest.mark.parametrize("recorded, settings, changed", [
    ("bfloat16", {}, 5), (None, {"view_dtype": "bfloat16"}, 5), (None, {}, 14), ("float32", {}, 14)])
def test_measure_judges_a_run_at_its_recorded_view(tmp_path, monkeypatch, recorded, settings, changed):
    monkeypatch.setattr(matrix, "eval_reward", lambda folder, settings: 0.0)
    _fp32_run(tmp_path, recorded)
    out = matrix.measure(tmp_path, tmp_path / "step_3", settings)
    assert out["changed_exact"] == pytest.approx(changed / 64) and out["final_step"] == 3
    assert out["view_dtype_used"] == (recorded or settings.get("view_dtype"))


@pytest.mark.slow
def test_small_sweep_records_failures_resumes_and_aggregates(tmp_path):
    matrix = {"output_dir": str(tmp_path / "out"), "base": BASE,
              "grid": {"task": ["rl-grpo", "sft"], "seed": [0, 1], "policy": ["tiny-gpt2", str(tmp_path / "nope")]},
              "per_task": {"rl-grpo": {"group_size": 2, "eval_every": 2}}}
    path = write(tmp_path, matrix)
    result = run_matrix(path, log=lambda msg: None)
    out = result.out
    assert result.runs == 8 and len(result.failed) == 4 and all("nope" in name for name in result.failed)
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 4 and all("nope" in r["error"] for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(0 < float(r["changed_exact"]) <= 1 and r["eval_reward"] for r in ok)
    with open(out / "grouped_summary.csv") as fh:
        grouped = list(csv.DictReader(fh))
    assert {g["task"] for g in grouped} == {"rl-grpo", "sft"} and all(g["seeds"] == "2" for g in grouped)
    grpo = [r for r in ok if r["task"] == "rl-grpo"]
    mean = sum(float(r["changed_relative"]) for r in grpo) / 2
    assert float(next(g for g in grouped if g["task"] == "rl-grpo")["changed_relative_mean"]) == pytest.approx(mean)
    assert (out / "sparsity_vs_settings.png").exists()
    seen = []
    run_matrix(path, log=seen.append)  # finished runs are skipped, failed ones are tried again
    assert sum("skipped" in m for m in seen) == 4 and sum("failed" in m for m in seen) == 4
