"""H2 and H3 (sparsity_hypotheses.py) and GRPO's advantage metrics, against hand and numpy values."""
import csv
import json

import numpy as np
import pytest
import torch

from subnetscope import grpo
from subnetscope.cli.hypotheses import main
from subnetscope.hypotheses import advantage_stats


def numpy_spearman(x, y) -> float:
    """Pearson correlation of the ranks (no ties in these data)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def numpy_excess_kurtosis(a) -> float:
    a = np.asarray(a, dtype=float)
    c = a - a.mean()
    return float((c**4).mean() / (c**2).mean() ** 2 - 3)


def test_advantage_stats_by_hand():
    a = torch.tensor([2.0, 0, 0, 0, -2.0, 0, 0, 0, 0, 0])
    stats = advantage_stats(a)
    # the top 10% (one sample) carries 2 of Σ|A| = 4; 8 of 10 are zero; variance 0.8, 4th moment 3.2: 3.2/0.64 - 3
    assert stats == pytest.approx({"advantage/sharpness": 0.5, "advantage/kurtosis": 2.0,
                                   "advantage/zero_fraction": 0.8, "advantage/abs_mean": 0.4})
    flat = advantage_stats(torch.tensor([1.0, -1.0] * 10))
    assert flat["advantage/sharpness"] == pytest.approx(0.1) and flat["advantage/kurtosis"] == pytest.approx(-2.0)
    assert advantage_stats(torch.zeros(8)) == {"advantage/sharpness": 0.0, "advantage/kurtosis": 0.0,
                                               "advantage/zero_fraction": 1.0, "advantage/abs_mean": 0.0}


def test_group_with_equal_rewards_counts_as_zero_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1, 0.9, 0.3, 0.5])  # the first group has no signal
    stats = advantage_stats(grpo.group_advantages(rewards, 4, 5.0))
    assert stats["advantage/zero_fraction"] == pytest.approx(0.5)


@pytest.mark.slow
def test_grpo_logs_the_advantage_stats_of_its_batch(tmp_path, monkeypatch):
    seen = []

    def capture(rewards, group_size, clip):
        adv = original(rewards, group_size, clip)
        seen.append(adv.clone())
        return adv

    original = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", capture)
    config = grpo.GRPOConfig(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="fp32",
                             batch_size=4, group_size=4, max_new_tokens=4, max_steps=2, save_every=2, eval_every=100,
                             output_dir=str(tmp_path / "run"), no_tqdm=True)
    grpo.GRPOTrainer(config).train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == len(logged) == 2
    for record, adv in zip(logged, seen):
        assert record["advantage/kurtosis"] == pytest.approx(numpy_excess_kurtosis(adv.numpy()), abs=1e-9)
        assert record["advantage/abs_mean"] == pytest.approx(float(adv.abs().mean()))
        assert record["advantage/zero_fraction"] == pytest.approx(float((adv.abs() < 1e-6).float().mean()))
        mags = np.sort(np.abs(adv.numpy()))[::-1]  # 16 samples: the top 10% is the largest two
        assert record["advantage/sharpness"] == pytest.approx(mags[:2].sum() / mags.sum())


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def h2_runs(tmp_path):
    """Three runs of 12 steps: changed grows with noise; the reward rises faster in sparser runs."""
    rng = np.random.default_rng(0)
    runs = {}
    for k, density in enumerate((0.05, 0.1, 0.2)):
        changed = density * np.linspace(0.1, 1, 12) + rng.normal(0, 0.002, 12)
        reward = 0.5 + (0.3 - density) * np.arange(12) / 12 + rng.normal(0, 0.01, 12)
        recs = [{"step": s + 1, "changed/relative": float(c), "reward/mean": float(r)}
                for s, (c, r) in enumerate(zip(changed, reward))]
        recs[5]["reward/mean"] = float("nan")  # a NaN step is left out, not a crash
        runs[f"run{k}"] = (write_run(tmp_path / f"run{k}", recs), changed, reward)
    return runs


def test_h2_correlations_equal_numpy(tmp_path):
    runs = h2_runs(tmp_path)
    out = tmp_path / "out"
    main(["h2", "--runs", *[str(r[0]) for r in runs.values()], "--window", "3", "--output_dir", str(out)])
    rows = {r["run"]: r for r in read_csv(out / "h2_per_run.csv")}
    finals = []
    for label, (_, changed, reward) in runs.items():
        keep = np.arange(12) != 5
        x, y = changed[keep], reward[keep]
        r = rows[label]
        assert int(r["steps"]) == 11
        assert float(r["within_spearman"]) == pytest.approx(numpy_spearman(x, y))
        assert float(r["within_pearson"]) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
        assert float(r["diff_pearson"]) == pytest.approx(float(np.corrcoef(np.diff(x), np.diff(y))[0, 1]))
        assert float(r["final_reward"]) == pytest.approx(y[-3:].mean())
        assert float(r["reward_gain"]) == pytest.approx(y[-3:].mean() - y[:3].mean())
        finals.append((x[-1], y[-3:].mean()))
    summary = json.loads((out / "h2_summary.json").read_text())
    across = summary["across_runs"]["final_changed_vs_final_reward"]
    assert across["n"] == 3 and across["spearman"] == pytest.approx(numpy_spearman(*zip(*finals)))
    assert across["spearman"] == pytest.approx(-1.0)  # the sparser run reached the higher reward
    assert (out / "h2_sparsity_vs_reward.png").stat().st_size > 0


def test_h3_correlates_each_advantage_metric_with_sparsity(tmp_path):
    rng = np.random.default_rng(1)
    sharp = rng.uniform(0.1, 0.6, 20)
    step_change = 0.5 - 0.6 * sharp + rng.normal(0, 0.01, 20)  # sharper steps change fewer weights
    recs = [{"step": i + 1, "advantage/sharpness": float(s), "advantage/kurtosis": float(3 * s),
             "step_change/exact": float(c), "changed/exact": 0.01 * (i + 1)}
            for i, (s, c) in enumerate(zip(sharp, step_change))]
    run = write_run(tmp_path / "grpo", recs)
    out = tmp_path / "out"
    main(["h3", "--runs", str(run), "--rule", "exact", "--output_dir", str(out)])
    rows = {(r["advantage"], r["target"]): r for r in read_csv(out / "h3_per_run.csv")}
    r = rows[("advantage/sharpness", "step_change/exact")]
    assert int(r["n"]) == 20 and float(r["spearman"]) == pytest.approx(numpy_spearman(sharp, step_change))
    assert float(r["spearman"]) < -0.9
    assert float(rows[("advantage/sharpness", "changed/exact")]["spearman"]) == pytest.approx(
        numpy_spearman(sharp, np.arange(20)))
    assert ("advantage/zero_fraction", "step_change/exact") not in rows  # not logged by this run: not invented
    assert (out / "h3_advantage_vs_sparsity.png").stat().st_size > 0


@pytest.mark.parametrize("case,needle", [("missing", "metrics.jsonl does not exist"), ("window", "--window"),
                                         ("labels", "--labels"), ("no_advantage", "advantage/*")])
def test_hypotheses_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, needle):
    run = write_run(tmp_path / "run", [{"step": 1, "changed/relative": 0.1, "reward/mean": 0.2}])
    args = {"missing": ["h2", "--runs", str(tmp_path / "nowhere")],
            "window": ["h2", "--runs", str(run), "--window", "0"],
            "labels": ["h2", "--runs", str(run), "--labels", "a", "b"],
            "no_advantage": ["h3", "--runs", str(run)]}[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*args, "--output_dir", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()
