"""The run matrix: validation before running, a small sweep, a failed run, resume and aggregation."""
import csv
import json

import pytest

from subnetscope.errors import SubnetscopeError
from subnetscope.matrix import expand, run_matrix


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
