"""compare_architectures.py: runs per model and seed, the localization study, seed-to-seed overlap."""
import csv
import json

import pytest
from transformers import AutoModelForCausalLM

from subnetscope.cli import compare
from subnetscope.cli.compare import main


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
    for r in rows:  # the overlap and its baseline come from the same two runs
        assert 0 <= float(r["o1"]) <= 1 and float(r["o1_random"]) == float(r["density_2"])
    assert (out / "tiny-gemma3n" / "shells.csv").exists() and (out / "localization_stats.csv").exists()
    json.loads((out / "comparison.json").read_text())
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
    (["--precision", "half"], "--precision 'half'"),
    (["--view_dtype", "bf16"], "--view_dtype 'bf16'"),
    (["--precision", "bf16", "--view_dtype", "float32"], "--view_dtype must be bfloat16"),
])
def test_bad_precision_flags_are_one_line_before_any_run(tmp_path, monkeypatch, capsys, flags, message):
    seen = fake_trainers(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--device", "cpu", "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and seen == [] and list(tmp_path.iterdir()) == []
