"""H2 and H3 of the research plan, from runs' metrics.jsonl alone.

H2, sparsity vs reward: do the checkpoints and runs that reach a higher reward change fewer (or more)
weights? Within each run, the correlation over steps of the changed fraction (vs θ0) with the reward,
both raw and of their step-to-step differences (which removes the trend both share with time); across
runs, the final changed fraction against the final reward and against the reward gain.

H3, advantage sharpness vs sparsity: do steps whose advantages concentrate on few samples change fewer
weights? GRPO logs `advantage/*` (`advantage_stats`) every step; each is correlated over steps with the
share of weights that step changed (`step_change/<rule>`, vs the previous step) and with the changed
fraction vs θ0, within each run and pooled over runs (per-run means across runs).

Correlations are Spearman's ρ and Pearson's r with scipy's two-sided p-values; consecutive steps are not
independent samples, so a p-value here describes, it does not test.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import SubnetscopeError

ZERO_ADVANTAGE = 1e-6  # |A| below this: the sample's group gave no signal (equal rewards), so no gradient
SHARP_TOP = 0.1
ADVANTAGE_KEYS = ("advantage/sharpness", "advantage/kurtosis", "advantage/zero_fraction", "advantage/abs_mean")
METRICS_FILE = "metrics.jsonl"


def advantage_stats(advantages: torch.Tensor) -> dict[str, float]:
    """How sharp one step's advantages are (H3): `sharpness`, the share of Σ|A| carried by the top 10% of
    samples by |A| (0.1 for equal |A|, 1 when a tenth carries everything); `kurtosis`, the excess kurtosis
    of A (0 for a normal distribution; 0 when A is constant); `zero_fraction`, the samples with |A| < 1e-6
    (their group scored every completion alike: no gradient); `abs_mean`, the mean |A|."""
    a = advantages.detach().double().reshape(-1).cpu()
    a = a[torch.isfinite(a)]
    if a.numel() == 0:
        return {}
    mag = a.abs()
    total = float(mag.sum())
    top = max(1, math.ceil(SHARP_TOP * a.numel()))
    centred = a - a.mean()
    var = float(centred.square().mean())
    return {
        "advantage/sharpness": float(mag.topk(top).values.sum()) / total if total > 0 else 0.0,
        "advantage/kurtosis": float(centred.pow(4).mean()) / var**2 - 3.0 if var > 0 else 0.0,
        "advantage/zero_fraction": float((mag < ZERO_ADVANTAGE).double().mean()),
        "advantage/abs_mean": float(mag.mean()),
    }


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl of a run (a half-written last line, as a killed run leaves, is dropped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise SubnetscopeError(f"{path} does not exist: pass run folders written by main_grpo.py / main_ppo.py")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise SubnetscopeError(f"{path} line {i} is not JSON: the file is damaged") from None
    return records


@dataclass
class Series:
    """Two metrics of one run over the steps that log both (finite values only)."""

    steps: list[int]
    x: list[float]
    y: list[float]


def paired(records: Sequence[dict], x_key: str, y_key: str) -> Series:
    steps, xs, ys = [], [], []
    for i, rec in enumerate(records):
        x, y = rec.get(x_key), rec.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            steps.append(int(rec.get("step", i + 1)))
            xs.append(float(x))
            ys.append(float(y))
    return Series(steps, xs, ys)


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    """Spearman ρ and Pearson r with their p-values; None where undefined (fewer than 3 points, or a constant)."""
    out: dict[str, float | int | None] = {"n": len(x), "spearman": None, "spearman_p": None,
                                          "pearson": None, "pearson_p": None}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    # imported here, not at the top: the GRPO trainer imports this module for advantage_stats alone
    from scipy import stats as sps

    rho = sps.spearmanr(x, y)
    r = sps.pearsonr(x, y)
    out.update(spearman=_finite(rho.statistic), spearman_p=_finite(rho.pvalue),
               pearson=_finite(r.statistic), pearson_p=_finite(r.pvalue))
    return out


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _tail_mean(values: Sequence[float], window: int) -> float | None:
    return float(np.mean(values[-window:])) if values else None


def check_runs(runs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """Labels for the runs (default: the folder names), refused in one line when they do not fit."""
    if not runs:
        raise SubnetscopeError("--runs needs at least one run folder")
    if labels is not None and len(labels) != len(runs):
        raise SubnetscopeError(f"--labels has {len(labels)} entries for {len(runs)} --runs: give one per run")
    names = list(labels) if labels else [Path(r).resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise SubnetscopeError("two runs share a label: pass --labels that tell them apart")
    return names


def sparsity_vs_reward(runs: dict[str, list[dict]], rule: str, reward_key: str, window: int) -> dict:
    """H2: per run the correlation over steps of `changed/<rule>` with the reward (raw and differenced), and
    across runs the final changed fraction (last step) against the final reward (mean of the last `window`
    steps) and against the gain (that minus the mean of the first `window`)."""
    changed_key = f"changed/{rule}"
    per_run = []
    for label, records in runs.items():
        s = paired(records, changed_key, reward_key)
        if not s.steps:
            raise SubnetscopeError(f"run {label!r} logs no step with both {changed_key} and {reward_key}: "
                                   "pass --reward_key with a key its metrics.jsonl has")
        final = _tail_mean(s.y, window)
        row = {"run": label, "steps": len(s.steps), "final_step": s.steps[-1], "final_changed": s.x[-1],
               "final_reward": final, "reward_gain": final - float(np.mean(s.y[:window]))}
        row.update({f"within_{k}": v for k, v in correlation(s.x, s.y).items()})
        row.update({f"diff_{k}": v for k, v in correlation(np.diff(s.x), np.diff(s.y)).items()})
        per_run.append(row)
    across = {
        "final_changed_vs_final_reward": correlation([r["final_changed"] for r in per_run],
                                                     [r["final_reward"] for r in per_run]),
        "final_changed_vs_reward_gain": correlation([r["final_changed"] for r in per_run],
                                                    [r["reward_gain"] for r in per_run]),
    }
    return {"hypothesis": "H2: sparsity vs reward", "x": changed_key, "y": reward_key, "window": window,
            "per_run": per_run, "across_runs": across}


def advantage_vs_sparsity(runs: dict[str, list[dict]], rule: str) -> dict:
    """H3: per run and advantage metric, the correlation over steps with the step's changed share
    (`step_change/<rule>`) and with `changed/<rule>`; across runs, of the per-run means."""
    targets = (f"step_change/{rule}", f"changed/{rule}")
    rows, means = [], {}
    for label, records in runs.items():
        logged = [k for k in ADVANTAGE_KEYS if any(k in rec for rec in records)]
        if not logged:
            raise SubnetscopeError(f"run {label!r} logs no advantage/* metric: H3 needs a GRPO run of this version "
                                   "(main_grpo.py logs advantage/sharpness, kurtosis, zero_fraction, abs_mean)")
        for key in logged:
            for target in targets:
                s = paired(records, key, target)
                rows.append({"run": label, "advantage": key, "target": target, **correlation(s.x, s.y),
                             "advantage_mean": float(np.mean(s.x)) if s.x else None,
                             "target_mean": float(np.mean(s.y)) if s.y else None})
                if s.x:
                    means.setdefault((key, target), []).append((float(np.mean(s.x)), float(np.mean(s.y))))
    across = [{"advantage": key, "target": target, **correlation([m[0] for m in pts], [m[1] for m in pts])}
              for (key, target), pts in means.items()]
    return {"hypothesis": "H3: advantage sharpness vs sparsity", "targets": list(targets), "per_run": rows,
            "across_runs": across}
