"""compare_architectures.py: runs per model and seed, the localization study, seed-to-seed overlap."""
import csv
import dataclasses
import json

import numpy as np
import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from subnetscope.cli import compare
from subnetscope.cli import ppo as ppo_cli
from subnetscope.cli.compare import main
from subnetscope.cli.training import config_from_args
from subnetscope.ppo import PPOConfig


def recount_overlap(run_a, run_b, step: int) -> tuple[int, int, int, int]:
    """n1, n2, |I1 ∩ I2| and the weights counted, from the changed-vs-θ0 masks the two runs saved at `step`,
    unpacked with numpy (first weight in the high bit), over the tensors the base and both runs hold."""
    with safe_open(str(run_a / "base" / "model.safetensors"), "numpy") as fh:
        names = set(fh.keys())
    masks = []
    for run in (run_a, run_b):
        with safe_open(str(run / f"step_{step}" / "subnet.safetensors"), "numpy") as fh:
            shapes = json.loads(fh.metadata()["shapes"])
            masks.append({n: np.unpackbits(fh.get_tensor(f"{n}::mask"))[:int(np.prod(s))].astype(bool)
                          for n, s in shapes.items()})
    names &= set(masks[0]) & set(masks[1])
    m1, m2 = (np.concatenate([m[n] for n in sorted(names)]) for m in masks)
    return int(m1.sum()), int(m2.sum()), int((m1 & m2).sum()), m1.size


@pytest.mark.slow
def test_comparison_end_to_end(tmp_path, capsys):
    args = ["--algo", "grpo", "--max_steps", "2", "--save_every", "2", "--batch_size", "4", "--max_new_tokens", "6",
            "--reward", "easy", "--dataset", "easy", "--device", "cpu", "--seeds", "0", "1",
            "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")]
    main(args)
    out = tmp_path / "cmp"
    with open(out / "seed_overlap.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"tiny-gpt2", "tiny-gemma3n"} and len(rows) == 2 * 3
    for r in rows:
        n1, n2, n12, numel = recount_overlap(tmp_path / "runs" / r["run_a"], tmp_path / "runs" / r["run_b"], step=2)
        if r["rule"] == "exact":  # the saved masks are the exact rule's: recounted, o1 and its chance baseline
            assert float(r["o1"]) == pytest.approx(n12 / n1) and float(r["o1_random"]) == pytest.approx(n2 / numel)
            assert float(r["density_1"]) == pytest.approx(n1 / numel)
        else:  # a weight over a tolerance also differs in bits: never denser than the exact rule
            assert float(r["density_2"]) <= n2 / numel and 0 <= float(r["o1"]) <= 1
    assert (out / "tiny-gemma3n" / "shells.csv").exists() and (out / "localization_stats.csv").exists()
    comparison = json.loads((out / "comparison.json").read_text())
    # the settings every run used, in the JSON and the CSV: main_grpo.py's defaults and the flags given
    assert comparison["settings_from"] == "main_grpo.py" and comparison["settings"]["max_steps"] == 2
    assert comparison["settings"]["lr"] == 1e-5 and comparison["settings"]["group_size"] == 4
    assert "max_steps" in comparison["settings_given"] and "lr" not in comparison["settings_given"]
    with open(out / "settings.csv") as fh:
        assert {r["setting"]: r["value"] for r in csv.DictReader(fh)}["beta"] == "0.04"
    with open(out / "runs.csv") as fh:
        speed = {(r["model"], r["seed"]): r for r in csv.DictReader(fh)}
    assert len(speed) == 4
    row = speed[("tiny-gpt2", "1")]
    metrics = tmp_path / "runs" / "tiny-gpt2-seed1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    step2 = [r for r in records if r.get("step") == 2 and "time/step" in r][0]
    assert int(row["steps"]) == 2 and float(row["steps_per_s"]) == pytest.approx(1 / step2["time/step"])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "tiny-gpt2-seed1" / "base")
    assert int(row["parameters"]) == base.num_parameters()  # tied lm_head counted once
    assert row["peak_gpu_gb"] == ""  # on the CPU there is no GPU peak to report
    capsys.readouterr()
    main(args)  # finished runs are reused, not retrained
    assert capsys.readouterr().out.count("finished before, reused") == 4


class Started(Exception):
    pass


def fake_trainers(monkeypatch) -> list:
    """Trainers that only record their config, and a stop once all have "trained": what compare would
    have trained, without training."""
    seen = []

    class Trainer:
        def __init__(self, config):
            seen.append(config)

        def train(self):
            pass

    def stop(*args):
        raise Started

    monkeypatch.setattr(compare, "ALGOS", {k: (cfg, Trainer) for k, (cfg, _) in compare.ALGOS.items()})
    monkeypatch.setattr(compare, "run_speed", stop)
    return seen


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_precision_and_view_dtype_reach_every_run(tmp_path, monkeypatch, algo):
    seen = fake_trainers(monkeypatch)
    with pytest.raises(Started):
        main(["--algo", algo, "--precision", "mixed", "--view_dtype", "float16", "--device", "cpu",
              "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")])
    assert [(c.precision, c.view_dtype) for c in seen] == [("mixed", "float16")] * 4  # 2 models x 2 seeds


@pytest.mark.parametrize("flags, message", [
    (["--precision", "half"], "--precision: invalid choice: 'half'"),
    (["--view_dtype", "bf16"], "--view_dtype: invalid choice: 'bf16'"),
    (["--precision", "bf16", "--view_dtype", "float32"], "--view_dtype must be bfloat16"),
    (["--policy", "gpt2"], "--policy does not apply"),
    (["--seed", "3"], "--seed does not apply"),
    (["--resume"], "--resume does not apply"),
    (["--algo", "grpo", "--ppo_epochs", "2"], "unrecognized arguments: --ppo_epochs 2"),
])
def test_bad_precision_flags_are_one_line_before_any_run(tmp_path, monkeypatch, capsys, flags, message):
    seen = fake_trainers(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--device", "cpu", "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and seen == [] and list(tmp_path.iterdir()) == []


def test_ppo_runs_get_main_ppo_defaults(tmp_path, monkeypatch, capsys):
    """Not compare's own PPO settings (they were fixed KL 0.02, 2 epochs, lr 1e-3): main_ppo.py's."""
    seen = fake_trainers(monkeypatch)
    with pytest.raises(Started):
        main(["--device", "cpu", "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")])
    assert len(seen) == 4
    d = PPOConfig()
    assert (d.lr, d.init_kl_coef, d.target_kl, d.ppo_epochs, d.mini_batch_size) == (1.41e-5, 0.2, 6.0, 4, 8)
    main_ppo = config_from_args(PPOConfig, ppo_cli.build_parser().parse_args(["--device", "cpu"]))
    for config in seen:
        assert dataclasses.replace(config, policy=d.policy, seed=0, output_dir=d.output_dir, resume=False,
                                   no_tqdm=False) == main_ppo
    assert {(c.policy, c.seed) for c in seen} == {("tiny-gpt2", 0), ("tiny-gpt2", 1), ("tiny-gemma3n", 0),
                                                  ("tiny-gemma3n", 1)}
    out = capsys.readouterr().out
    assert "main_ppo.py's defaults unless given: device" in out
    assert "lr=1.41e-05" in out and "init_kl_coef=0.2" in out and "ppo_epochs=4" in out


def test_flags_and_presets_override_the_defaults_and_are_recorded(tmp_path, monkeypatch):
    seen = fake_trainers(monkeypatch)
    with pytest.raises(Started):
        main(["--short", "--lr", "1e-3", "--fixed_kl", "--ppo_epochs", "2", "--device", "cpu",
              "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")])
    assert {(c.lr, c.target_kl, c.ppo_epochs, c.max_steps, c.save_every, c.init_kl_coef) for c in seen} == {
        (1e-3, None, 2, 10, 5, 0.2)}
    with open(tmp_path / "cmp" / "settings.csv") as fh:
        rows = {r["setting"]: r for r in csv.DictReader(fh)}
    assert (rows["lr"]["value"], rows["lr"]["source"]) == ("0.001", "flag")
    assert rows["target_kl"]["source"] == "flag" and rows["max_steps"]["source"] == "preset"
    assert (rows["init_kl_coef"]["value"], rows["init_kl_coef"]["source"]) == ("0.2", "main_ppo.py default")
    assert "policy" not in rows and "seed" not in rows  # set per run
