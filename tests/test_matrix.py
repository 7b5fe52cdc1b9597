"""The run matrix: validation before running, a small sweep, a failed run, resume and aggregation."""
import csv
import json
from pathlib import Path

import pytest
import torch

from subnetscope import matrix
from subnetscope.errors import SubnetscopeError
from subnetscope.matrix import expand, run_matrix

from .conftest import SHAKESPEARE, TINY_GPT2_DIR, requires_shared, save_state

ROOT = Path(__file__).resolve().parents[1]


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
    ({"grid": {"task": ["pretrain"]}, "base": {"dataset": "easy"}}, "'easy' is a set of RL prompts"),
    ({"grid": {"task": ["pretrain"]}, "base": {"group_size": 4}}, "'group_size' is not a setting of pretrain runs"),
    ({"grid": {"task": ["sft"], "lr": [1e-3]}, "base": {"lr": 1e-4}, "vary": {"lr": [1e-5]}}, "'lr' is in both grid"),
    ({"grid": {"task": ["sft"]}, "vary": {"lr": [1e-5]}}, "vary's 'lr' needs its centre value in base"),
    ({"grid": {"task": ["sft"]}, "vary": [1e-5]}, "vary must map settings to lists"),
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


def test_one_factor_at_a_time_varies_each_factor_alone_around_the_centre():
    centre = {**BASE, "lr": 1e-3, "optimizer": "adamw", "batch_size": 4}
    runs = expand({"base": centre, "grid": {"task": ["sft", "pretrain"], "seed": [0, 1]},
                   "vary": {"lr": [1e-4, 1e-3, 3e-3], "optimizer": ["sgd"], "batch_size": [2, 8]},
                   "per_task": {"pretrain": {"dataset": "imdb"}}})
    # per task and seed: the centre, lr 1e-4 and 3e-3 (1e-3 is the centre's), sgd, batch 2 and 8
    assert len(runs) == 2 * 2 * 6
    for run in runs:
        same = [r for r in runs if r["task"] == run["task"] and r["settings"]["seed"] == run["settings"]["seed"]
                and r["factor"] == "centre"]
        assert len(same) == 1
        differ = {k for k, v in run["settings"].items() if same[0]["settings"][k] != v}
        assert differ == (set() if run["factor"] == "centre" else {run["factor"]})
    factors = [r["factor"] for r in runs if r["task"] == "sft" and r["settings"]["seed"] == 0]
    assert factors == ["centre", "lr", "lr", "optimizer", "batch_size", "batch_size"]
    assert {r["name"] for r in runs if r["factor"] == "optimizer"} == {
        "sft__seed=0__optimizer=sgd", "sft__seed=1__optimizer=sgd", "pretrain__seed=0__optimizer=sgd",
        "pretrain__seed=1__optimizer=sgd"}


def test_ready_gpu_configs_hold_the_plans_tasks_models_and_designs():
    from subnetscope.matrix import load_matrix

    cross = expand(load_matrix(str(ROOT / "configs" / "matrix_gpu.yaml")))
    assert {r["task"] for r in cross} == {"rl-grpo", "rl-ppo", "sft", "dpo", "pretrain"}
    assert "gpt2-large" in {r["settings"]["policy"] for r in cross}
    assert len(cross) == 5 * 4 * 3 * 3 * 3
    one = expand(load_matrix(str(ROOT / "configs" / "matrix_gpu_one_factor.yaml")))
    centre = [r for r in one if r["factor"] == "centre"]
    assert len(centre) == 5 * 3 and len(one) == 5 * 3 * 12
    assert {r["settings"]["policy"] for r in centre} == {"gpt2-medium"}
    assert {r["factor"] for r in one} == {"centre", "policy", "lr", "optimizer", "max_steps", "batch_size"}
    cpu = expand(load_matrix(str(ROOT / "configs" / "matrix_cpu_one_factor.yaml")))
    assert len(cpu) == 3 * 2 * 4 and {r["task"] for r in cpu} == {"rl-grpo", "sft", "pretrain"}


@requires_shared(TINY_GPT2_DIR)
@requires_shared(SHAKESPEARE)
@pytest.mark.slow
def test_pretrain_task_changed_share_equals_an_independent_diff(tmp_path):
    from safetensors.torch import load_file

    data = {"output_dir": str(tmp_path / "out"),
            "base": {"policy": str(TINY_GPT2_DIR), "dataset": str(SHAKESPEARE), "reward": "easy", "device": "cpu",
                     "max_steps": 3, "save_every": 2, "max_new_tokens": 4, "batch_size": 4, "lr": 1e-3,
                     "precision": "fp32", "view_dtype": "bfloat16"},
            "grid": {"task": ["pretrain"]}, "per_task": {"pretrain": {"seq_len": 32}}}
    result = run_matrix(write(tmp_path, data), log=lambda msg: None)
    assert result.failed == []
    run = tmp_path / "out" / "runs" / "pretrain"
    done = json.loads((run / "done.json").read_text())
    base = load_file(str(run / "base" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert base.keys() == final.keys() and {v.dtype for v in base.values()} == {torch.bfloat16}
    changed = sum(int((base[k] != final[k]).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    # the bf16 view hides the smallest fp32 steps: some, not all, entries changed
    assert 0 < changed < total
    assert done["changed_exact"] == pytest.approx(changed / total, rel=1e-12)
    assert done["final_step"] == 3 and done["view_dtype_used"] == "bfloat16"
    tracked = [json.loads(line) for line in (run / "subnet_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in tracked] == [1, 2, 3] and tracked[-1]["changed/exact"] == pytest.approx(changed / total)
    config = json.loads((run / "run_config.json").read_text())
    assert config["algorithm"] == "PRETRAIN" and config["settings"]["windows"] == 3 * 4
    assert {"checkpoint-2", "checkpoint-3"} <= {p.name for p in run.iterdir()}


@requires_shared(TINY_GPT2_DIR)
def test_pretrain_text_becomes_consecutive_windows(tmp_path):
    from subnetscope.data import language_model_windows
    from subnetscope.models import load_tokenizer
    from subnetscope.pretrain import PretrainConfig, one_pass

    tokenizer = load_tokenizer(str(TINY_GPT2_DIR))
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nAy me.\n" * 3
    (tmp_path / "play.txt").write_text(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = language_model_windows(str(tmp_path / "play.txt"), tokenizer, 8, limit=1, seed=0)
    assert windows == [ids[i:i + 8] for i in range(0, len(ids) - 7, 8)]  # one document: the limit is unused
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Good film.", "Bad.")))
    stream = [t for w in language_model_windows(str(tmp_path / "reviews.jsonl"), tokenizer, 1, 10, 0) for t in w]
    assert sorted(stream) == sorted(tokenizer("Good film.")["input_ids"] + tokenizer("Bad.")["input_ids"]
                                    + [tokenizer.eos_token_id] * 2)
    with pytest.raises(SubnetscopeError, match="fewer than one window of --seq_len 4096"):
        language_model_windows(str(tmp_path / "play.txt"), tokenizer, 4096, 1, 0)
    config = PretrainConfig(max_steps=2, batch_size=3)
    chosen = one_pass(windows, config)
    assert len(chosen) == 6 and all(w in windows for w in chosen) and len({tuple(w) for w in chosen}) == 6
    assert one_pass(windows[:4], config) == windows[:4]


@requires_shared(TINY_GPT2_DIR)
@requires_shared(SHAKESPEARE)
@pytest.mark.slow
def test_pretrain_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_does(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from subnetscope.pretrain import PretrainConfig, train_pretrain

    def config(folder: str, resume: bool = False) -> PretrainConfig:
        return PretrainConfig(policy=str(TINY_GPT2_DIR), dataset=str(SHAKESPEARE), device="cpu", precision="fp32",
                              max_steps=3, save_every=2, batch_size=2, seq_len=16, lr=1e-3,
                              output_dir=str(tmp_path / folder), resume=resume)

    train_pretrain(config("full"))
    train_pretrain(config("cut"))
    for leftover in ("checkpoint-3", "final"):  # as if killed after checkpoint-2
        shutil.rmtree(tmp_path / "cut" / leftover)
    train_pretrain(config("cut", resume=True))
    full = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "subnet_metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
