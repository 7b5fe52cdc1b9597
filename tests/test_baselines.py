"""SFT and DPO baselines: data from ranked samples, and the tracker against the trainers' checkpoints."""
from pathlib import Path

import pytest

from subnetscope.baselines import BaselineConfig, dpo_records, sft_records, train_baseline
from subnetscope.changes import RULES
from subnetscope.errors import SubnetscopeError

from .test_grpo_run import offline_counts


def test_records_keep_the_best_and_the_worst():
    samples = [[(0.9, "great"), (0.1, "fine"), (-0.5, "awful")], [(0.2, "same"), (0.2, "same")], []]
    prompts = ["a", "b", "c"]
    assert sft_records(prompts, samples) == {"prompt": ["a", "b"], "completion": [" great", " same"]}
    assert dpo_records(prompts, samples) == {"prompt": ["a"], "chosen": [" great"], "rejected": [" awful"]}
    with pytest.raises(SubnetscopeError, match="no prompt got samples of different reward"):
        dpo_records(["b"], [samples[1]])


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_tracker_counts_equal_the_trainers_checkpoints_and_resume(tmp_path, task):
    cfg = dict(task=task, reward="easy", dataset="easy", device="cpu", max_new_tokens=8, lr=1e-3, save_every=2,
               output_dir=str(tmp_path / task))
    train_baseline(BaselineConfig(max_steps=2, **cfg))
    callback = train_baseline(BaselineConfig(max_steps=4, resume=True, **cfg))
    run = Path(cfg["output_dir"])
    assert [r.step for r in callback.history] == [3, 4]  # resumed after checkpoint-2
    record = callback.history[-1]
    offline = offline_counts(run, run / "checkpoint-4")
    for i, name in enumerate(record.names):
        for rule in RULES:
            assert record.vs_initial[rule][i] == offline[name][rule]
        assert record.ever_changed[i] >= record.vs_initial["exact"][i]
    assert (run / "checkpoint-2" / "subnet_tracker.safetensors").exists() and (run / "final").is_dir()


def test_bad_settings():
    with pytest.raises(SubnetscopeError, match="--task"):
        BaselineConfig(task="ppo").validate()
    with pytest.raises(SubnetscopeError, match="--candidates"):
        BaselineConfig(candidates=1).validate()
