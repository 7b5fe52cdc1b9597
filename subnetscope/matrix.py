"""The run matrix: a YAML/JSON file of runs (task × model × lr × optimizer × seed ...), run one after
another, resumable, then aggregated into summary.csv, grouped_summary.csv and plots.

    output_dir: checkpoints/matrix
    base: {dataset: easy, reward: easy, max_steps: 6, device: cpu, precision: auto}   # every run
    grid: {task: [rl-grpo, sft, pretrain], policy: [tiny-gpt2], lr: [1e-3], seed: [0, 1]}
    per_task: {rl-grpo: {group_size: 4}, pretrain: {dataset: ../shared/data/tinyshakespeare/input.txt}}

`grid` is the full cross. The research plan's one-factor-at-a-time design is `vary`: base holds the
centre point, and each key of `vary` is varied alone (its other values, every other factor at the
centre), crossed with the grid (e.g. task × seed):

    base: {policy: gpt2, lr: 1e-5, optimizer: adamw, ...}
    grid: {task: [rl-grpo, sft, pretrain], seed: [0, 1, 2]}
    vary: {policy: [gpt2-medium, gpt2-large], lr: [1e-6, 1e-4], optimizer: [sgd]}

Tasks: rl-grpo, rl-ppo (RL), sft, dpo (TRL baselines) and pretrain (continued language-model training
on text, pretrain.py). Every key and value is checked against the task's config before anything runs
(`precision`: auto, mixed, bf16 or fp32, and `view_dtype` replace the old `dtype`). Each run's
sparsity is judged at the view dtype it recorded (bf16 under mixed). A run that fails
is recorded as failed, with its error, and the sweep goes on; a finished run (done.json) is
skipped when the sweep is started again, a half-done one resumes from its checkpoint.
"""
from __future__ import annotations

import itertools
import json
import re
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import plots
from .baselines import BaselineConfig, train_baseline
from .changes import RULES, ChangeRules
from .checkpoint import atomic_write_file, find_step_checkpoints, open_checkpoint
from .cli.dataclass_args import check_value
from .data import EVAL_PROMPTS
from .engine import analyze_pair
from .errors import SubnetscopeError
from .grpo import GRPOConfig, GRPOTrainer
from .models import load_causal_lm, load_tokenizer
from .outputs import check_output_dir
from .ppo import PPOConfig, PPOTrainer
from .pretrain import PretrainConfig, train_pretrain
from .report import rank_summary, write_csv, write_json
from .rewards import build_reward, score_rollout
from .runstate import RUN_CONFIG, read_run_config
from .sampling import generate
from .stats import mean_and_sd

TASKS = {"rl-grpo": GRPOConfig, "rl-ppo": PPOConfig, "sft": BaselineConfig, "dpo": BaselineConfig,
         "pretrain": PretrainConfig}
TOP_KEYS = {"output_dir", "base", "grid", "vary", "per_task"}
MANAGED = {"output_dir", "resume", "task"}
REPLACED = {"dtype": "precision (auto, mixed, bf16 or fp32) and view_dtype (bfloat16, float16 or float32)"}


def _parse(path: str, text: str, suffix: str):
    """The file's data; a syntax error becomes one line naming the file, the problem and its line."""
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            where = f"line {err.lineno}, column {err.colno}"
            raise SubnetscopeError(f"{path}: not valid JSON at {where}: {err.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(filter(None, (getattr(err, "problem", None), getattr(err, "context", None)))) or str(err)
        raise SubnetscopeError(f"{path}: not valid YAML{where}: {problem}") from None


def load_matrix(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SubnetscopeError(f"{path} does not exist: pass a matrix file (.yaml, .yml or .json)")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise SubnetscopeError(f"{path}: use a .yaml, .yml or .json matrix file")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise SubnetscopeError(f"{path} is not a text file: pass a YAML or JSON matrix file") from None
    data = _parse(path, text, p.suffix)
    if not isinstance(data, dict):
        raise SubnetscopeError(f"{path}: the matrix file must be a mapping with keys {sorted(TOP_KEYS)}")
    return data


def _check_value(task: str, key: str, value, config_cls) -> object:
    """The value converted to the field's type and checked as its flag is (dataclass_args.check_value), or
    an error naming the key and the value."""
    known = {f.name for f in fields(config_cls)}
    if key not in known and key in REPLACED:
        raise SubnetscopeError(f"matrix: {key!r} was replaced by {REPLACED[key]}")
    if key not in known or key in MANAGED:
        raise SubnetscopeError(f"matrix: {key!r} is not a setting of {task} runs")
    try:
        return check_value(config_cls, key, value, f" for {task} runs")
    except SubnetscopeError as err:
        raise SubnetscopeError(f"matrix: {err}") from None


def expand(matrix: dict) -> list[dict]:
    """Every run of the matrix as {task, name, settings, axes, factor}, each checked by its config's
    validate(); `factor` is the `vary` key a one-factor-at-a-time run varies ("centre" for the centre
    point, None without `vary`)."""
    unknown = set(matrix) - TOP_KEYS
    if unknown:
        raise SubnetscopeError(f"matrix: unknown top-level key(s) {sorted(unknown)}; use {sorted(TOP_KEYS)}")
    base = matrix.get("base") or {}
    grid = matrix.get("grid") or {}
    per_task = matrix.get("per_task") or {}
    tasks = grid.get("task", base.get("task", ["rl-grpo"]))
    tasks = tasks if isinstance(tasks, list) else [tasks]
    for task in [*tasks, *per_task]:
        if task not in TASKS:
            raise SubnetscopeError(f"matrix: unknown task {task!r}; use {sorted(TASKS)}")
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items() if k != "task"}
    variants = _one_factor_variants(matrix.get("vary"), base, axes)
    runs = []
    for task in tasks:
        config_cls = TASKS[task]
        for combo in itertools.product(*axes.values()) if axes else [()]:
            for factor, varied in variants:
                run_axes = {**dict(zip(axes, combo)), **varied}
                raw = {**{k: v for k, v in base.items() if k != "task"}, **run_axes, **(per_task.get(task) or {})}
                settings = {k: _check_value(task, k, v, config_cls) for k, v in raw.items()}
                if config_cls is BaselineConfig:
                    settings["task"] = task
                config_cls(**settings).validate()
                runs.append({"task": task, "name": run_name(task, run_axes), "settings": settings, "axes": run_axes,
                             "factor": factor})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise SubnetscopeError("matrix: two runs have the same settings; remove the duplicate grid values")
    return runs


def _one_factor_variants(vary, base: dict, axes: dict) -> list[tuple[str | None, dict]]:
    """(factor, {key: value}) of a one-factor-at-a-time design: the centre point (base's values), then
    each `vary` key at each of its values other than the centre's; [(None, {})] without `vary`."""
    if vary is None:
        return [(None, {})]
    if not isinstance(vary, dict) or not vary:
        raise SubnetscopeError("matrix: vary must map settings to lists of values, e.g. {lr: [1e-6, 1e-4]}")
    variants: list[tuple[str | None, dict]] = [("centre", {})]
    for key, values in vary.items():
        if key == "task" or key in axes:
            raise SubnetscopeError(f"matrix: {key!r} is in both grid and vary: cross it (grid) or vary it alone (vary)")
        if key not in base:
            raise SubnetscopeError(f"matrix: vary's {key!r} needs its centre value in base: add {key}: VALUE to base")
        values = values if isinstance(values, list) else [values]
        variants += [(key, {key: v}) for v in values if v != base[key]]
    return variants


def run_name(task: str, axes: dict) -> str:
    """A run's folder name: its task and the values of the matrix's axes (the study finds runs by it too)."""
    parts = [task] + [f"{k}={v}" for k, v in axes.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts))


def run_one(run: dict, folder: Path, detail: bool = False) -> dict:
    """Train one run (resuming it if half done) and measure what the summary needs."""
    settings = {**run["settings"], "output_dir": str(folder)}
    started = folder.exists()
    task = run["task"]
    if task in ("sft", "dpo"):
        train_baseline(BaselineConfig(**settings, resume=started))
        checkpoint_dir = find_step_checkpoints(str(folder))[-1].path
    elif task == "pretrain":
        train_pretrain(PretrainConfig(**settings, resume=started))
        checkpoint_dir = find_step_checkpoints(str(folder))[-1].path
    else:
        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if task == "rl-grpo" else (PPOConfig, PPOTrainer)
        settings.setdefault("no_tqdm", True)
        trainer_cls(config_cls(**settings, resume=started)).train()
        checkpoint_dir = find_step_checkpoints(str(folder))[-1].path
    return measure(folder, checkpoint_dir, run["settings"], detail)


def run_view(folder: Path, settings: dict) -> str | None:
    """The view dtype a run was judged at: what its run_config.json recorded (`--precision auto`
    resolved on its device), else its `view_dtype` setting; None: its checkpoints' own dtype."""
    if (folder / RUN_CONFIG).is_file():
        recorded = read_run_config(folder)["settings"].get("view_dtype_used")
        if recorded:
            return recorded
    return settings.get("view_dtype")


def measure(folder: Path, checkpoint_dir: Path, settings: dict, detail: bool = False) -> dict:
    """Final sparsity per rule (at the run's view dtype), per-block Gini and evaluation reward of a
    finished run; with `detail` also the entropy and top-k share across blocks and the update rank
    (one SVD per matrix)."""
    config_rules = {"atol": settings.get("atol", 1e-5), "eta": settings.get("eta", 1e-3)}
    view = run_view(folder, settings)
    pair = analyze_pair(open_checkpoint(str(folder / "base")), open_checkpoint(str(checkpoint_dir)),
                        ChangeRules(**config_rules), device="cpu", rank=detail, progress=False, view_dtype=view)
    k = settings.get("topk", 3)
    loc = pair.localization(k)["relative"]["count_per_weight"]
    out = {f"changed_{r}": pair.fraction(r) for r in RULES}
    out["view_dtype_used"] = view
    out["gini_relative"] = loc["gini"]
    if detail:
        ranks = rank_summary(pair) or {}
        out.update({"entropy_relative": loc["entropy"], f"top{k}_relative": loc[f"top{k}"],
                    "rank_percent_mean": ranks.get("mean_percent"), "rank_percent_min": ranks.get("min_percent")})
    out["final_step"] = int(checkpoint_dir.name.split("-")[-1].split("_")[-1])
    out["eval_reward"] = eval_reward(folder / "final", settings)
    return out


@torch.no_grad()
def eval_reward(model_dir: Path, settings: dict) -> float:
    """Mean reward of greedy completions of the fixed evaluation prompts: the same test for every task."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), torch.float32).eval()
    reward = build_reward(settings.get("reward", "vader"), settings.get("reward_model", "lvwerra/distilbert-imdb"),
                          "cpu")
    prompts = list(EVAL_PROMPTS)
    rollout = generate(model, tokenizer, prompts, torch.arange(len(prompts)), seed=0, step=0,
                       max_new_tokens=settings.get("max_new_tokens", 32), greedy=True)
    return float(torch.nanmean(score_rollout(reward, prompts, rollout)))


@dataclass(frozen=True)
class SweepResult:
    """Where a sweep's summaries went and which of its runs failed (their errors are in runs/<run>.error.txt)."""

    out: Path
    runs: int
    failed: list[str]


def run_matrix(path: str, output_dir: str | None = None, log=print) -> SweepResult:
    """The sweep of a matrix file; the file and its output folder are checked before anything runs."""
    matrix = load_matrix(path)
    target = output_dir or matrix.get("output_dir") or "checkpoints/matrix"
    if not isinstance(target, str):
        raise SubnetscopeError(f"{path}: output_dir {target!r} is not a folder path: write it as a string")
    out = check_output_dir(target, "--output_dir" if output_dir else f"{path}: output_dir")
    return run_runs(matrix, out, log)


def run_runs(matrix: dict, out: Path, log=print, detail: bool = False) -> SweepResult:
    """Every run of a matrix (a mapping as in the file), resumable, then the summaries; `detail`
    as in `measure`."""
    runs = expand(matrix)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, run in enumerate(runs, 1):
        folder = out / "runs" / run["name"]
        done = folder / "done.json"
        if done.is_file():
            result = json.loads(done.read_text())
            log(f"[{i}/{len(runs)}] {run['name']}: done before, skipped")
        else:
            log(f"[{i}/{len(runs)}] {run['name']}: running")
            try:
                result = {"status": "ok", **run_one(run, folder, detail)}
                write_json(done, result)
            except Exception as err:  # a failed run is recorded with its error; the sweep goes on
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                result = {"status": "failed", "error": f"{type(err).__name__}: {message}"}
                trace = traceback.format_exc()
                atomic_write_file(out / "runs" / f"{run['name']}.error.txt", lambda tmp: tmp.write_text(trace))
                log(f"[{i}/{len(runs)}] {run['name']}: failed: {result['error']}")
        factor = {"factor": run["factor"]} if run.get("factor") else {}
        rows.append({"run": run["name"], "task": run["task"], **factor, **run["settings"], **result})
    write_summaries(rows, out)
    return SweepResult(out, len(rows), [r["run"] for r in rows if r["status"] != "ok"])


def write_summaries(rows: list[dict], out: Path) -> None:
    write_csv(out / "summary.csv", rows)
    metrics = [f"changed_{r}" for r in RULES] + ["gini_relative", "eval_reward"]
    extra = {k for r in rows for k in r if k.endswith("_relative") or k.startswith("rank_percent_")}
    metrics += sorted(extra - set(metrics))
    groups: dict[tuple, list[dict]] = {}
    keys = sorted({k for r in rows for k in r} - set(metrics) - {"run", "seed", "status", "error", "final_step",
                                                                 "output_dir"})
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault(tuple((k, json.dumps(row.get(k))) for k in keys), []).append(row)
    grouped = []
    for key, members in groups.items():
        entry = {k: json.loads(v) for k, v in key}
        entry["seeds"] = len(members)
        for m in metrics:
            entry[f"{m}_mean"], entry[f"{m}_std"] = mean_and_sd([r.get(m) for r in members])
        grouped.append(entry)
    write_csv(out / "grouped_summary.csv", grouped)
    plots.sweep_density(rows, out / "sparsity_vs_settings.png")
