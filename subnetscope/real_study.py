"""The RL-sparsity study on real pretrained models: GRPO, PPO, DPO, SFT and rejection-sampling SFT
(RFT) from one policy, on a verifiable task and on IMDB sentiment, several seeds, two learning rates.

One group = one policy x one task. Its runs (algorithm x lr x seed, plus GRPO with pure bf16 weights as
the stagnation contrast) run as parallel processes (`jobs`), each resumable; every finished run leaves
a small summary.json (changed share under the three rules, the density curve, per-layer and per-module
tables, update rank, held-out score before and after). The group's report adds seed-to-seed overlap,
the subnetwork-only GRPO rerun and the precision split, and writes small files to
`results_dir/<policy>__<task>/` (an arithmetic difficulty other than the default also named:
`RealStudyConfig.group`); `write_tables` then builds `table.md` over every group found there, so groups
measured in different sessions (the GPU comes in 30-minute pieces) make one table.

Learning rates: each algorithm's usual one (RL 1e-6 as in the paper's recipes; SFT and RFT 1e-5, the
usual SFT lr) and one shared lr (1e-6) for all, so "RL vs SFT" is not only "small vs large lr".
"""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .arithmetic import Difficulty, make_problems
from .changes import RULES, ChangeRules
from .checkpoint import open_checkpoint
from .config import setting, yes_no
from .errors import SubnetscopeError
from .logger import read_metrics
from .report import write_csv, write_json

TASKS = ("arithmetic", "imdb")
ALGOS = ("grpo", "ppo", "dpo", "sft", "rft")
USUAL_LR = {"grpo": 1e-6, "ppo": 1e-6, "dpo": 1e-6, "sft": 1e-5, "rft": 1e-5}
TASK_REWARD = {"arithmetic": "arithmetic", "imdb": "vader"}
# RFT keeps a sample when its reward reaches this: a correct answer; a clearly positive VADER score
RFT_MIN_REWARD = {"arithmetic": 1.0, "imdb": 0.5}
VIEW = "bfloat16"
SUMMARY = "summary.json"
# a run that ran out of GPU memory or disk space beside the others is tried again this often, with fewer runs
# at a time
OUT_OF_ROOM_RETRIES = 2
DATA_SEED = 1234  # the task data (problems, review order): the same for every run, seed and session
# resume state a finished run no longer needs (optimizer moments, fp32 masters, TRL's full weights): the
# study keeps base/, final/, the metrics and the tracker state (the subnetwork mask is read from it)
RESUME_ONLY = ("optimizer.pt", "trainer_state.pt", "master.safetensors", "model.safetensors", "scheduler.pt")


@dataclass
class RealStudyConfig:
    """One group of the study: a policy on a task."""

    policy: str = setting("smollm2-135m-instruct", "a real model (smollm2-135m-instruct, gemma3-270m), a local "
                          "model folder, or tiny-gpt2 for tests")
    task: str = setting("arithmetic", "arithmetic (exact match of the final number) or imdb (VADER sentiment of "
                        "continued review openings)", choices=TASKS)
    algos: list[str] = setting(list(ALGOS), "algorithms: grpo ppo dpo sft rft (rft = SFT on the policy's own "
                               "reward-passing samples)", choices=ALGOS,
                               metavar="ALGO")
    seeds: list[int] = setting([0, 1, 2], "seeds of every run")
    shared_lr: float = setting(1e-6, "the lr every algorithm also runs at, beside its usual one (RL 1e-6, SFT "
                               "and RFT 1e-5)")
    max_steps: int = setting(300, "updates per run")
    save_every: int = setting(25, "checkpoint every N updates (only the newest is kept)")
    batch_size: int = setting(16, "prompts per update")
    group_size: int = setting(4, "GRPO completions per prompt; DPO and RFT samples per prompt")
    max_new_tokens: int = setting(40, "completion length")
    max_value: int = setting(10, "arithmetic: operands are integers in [2, max_value], joined by + and *")
    # SmolLM2-135M-Instruct's held-out accuracy before training (greedy, 200 problems, CPU fp32, session 12):
    # 2-3 operands up to 10: 8% (GPU); two operands up to 10: 64% (but 162 problems only), up to 20: 38.5%
    # (722 problems: --train_prompts 500), up to 35: 22%, up to 50: 20%. The issue asks for 20-60%.
    max_operands: int = setting(3, "arithmetic: at most this many operands (2 or more)")
    train_prompts: int = setting(2000, "training prompts generated (arithmetic) or read (imdb)")
    heldout_prompts: int = setting(200, "held-out prompts for the score before and after (arithmetic: accuracy)")
    imdb: str = setting("../shared/data/imdb/train.jsonl.gz", "labelled IMDB reviews (the imdb task; prompts: "
                        "openings of all reviews, SFT targets: real positive reviews)")
    chat_template: bool | None = setting(None, "prompts in the tokenizer's chat template: yes or no (None: when "
                                         "it has one)", type=yes_no, metavar="{yes,no}")
    jobs: int = setting(1, "runs at once, each its own process (0: one after another in this process); on "
                        "several GPUs the processes are spread evenly over CUDA_VISIBLE_DEVICES (every GPU "
                        "when unset), the CPU cores shared out among them; a run process that runs out of GPU "
                        "memory or disk space is tried again, resuming, with fewer runs at a time")
    device: str = setting("auto", "auto, cpu or cuda")
    precision: str = setting("mixed", "the main runs' precision: mixed (fp32 masters, bf16 view) or fp32")
    rft_min_reward: float | None = setting(None, "RFT keeps a prompt's best sample when it scores at least this "
                                           "(None: 1 = correct for arithmetic, 0.5 for imdb's VADER score)")
    contrast: bool = setting(True, "also GRPO seed 0 with pure bf16 weights, the bf16-stagnation contrast "
                             "(yes/no)", type=yes_no, metavar="{yes,no}")
    subnetwork: bool = setting(True, "also GRPO seed 0 confined to the weights its full run changed, started "
                               "as soon as that run ends (yes/no)", type=yes_no, metavar="{yes,no}")
    train: bool = setting(True, "no: start no run, write the group's results from the runs finished so far (a "
                          "study cut short); overlap pairs whose checkpoints are gone keep their rows from the "
                          "overlap.csv already there", type=yes_no, metavar="{yes,no}")
    note: str = setting("", "a sentence the table prints under the group (e.g. why runs are missing)")
    output_dir: str = setting("checkpoints/real_study", "where the runs go (large)")
    results_dir: str = setting("results/real_study", "where the small result files and table.md go")

    def validate(self) -> None:
        if self.task not in TASKS:
            raise SubnetscopeError(f"--task {self.task!r}: use {' or '.join(TASKS)}")
        unknown = [a for a in self.algos if a not in ALGOS]
        if unknown:
            raise SubnetscopeError(f"--algos {' '.join(unknown)}: choose from {', '.join(ALGOS)}")
        if min(self.max_steps, self.save_every, self.batch_size, self.max_new_tokens, self.train_prompts,
               self.heldout_prompts) < 1:
            raise SubnetscopeError("--max_steps, --save_every, --batch_size, --max_new_tokens, --train_prompts and "
                                   "--heldout_prompts must be at least 1")
        if self.group_size < 2 or self.jobs < 0 or not self.shared_lr > 0 or not self.seeds:
            raise SubnetscopeError("--group_size must be at least 2, --jobs at least 0, --shared_lr positive, and "
                                   "--seeds must name at least one seed")
        if self.max_operands < 2 or self.max_value < 2:
            raise SubnetscopeError("--max_operands and --max_value must be at least 2")
        available, needed = self.difficulty().distinct_problems(), self.train_prompts + self.heldout_prompts
        if self.task == "arithmetic" and available < needed:
            raise SubnetscopeError(f"--max_operands {self.max_operands} --max_value {self.max_value} give only "
                                   f"{available} distinct problems, fewer than the {needed} of --train_prompts + "
                                   "--heldout_prompts: raise --max_value or lower the counts")
        if self.task == "imdb" and not Path(self.imdb).is_file():
            raise SubnetscopeError(f"--imdb {self.imdb} does not exist: pass a labelled IMDB file such as "
                                   "../shared/data/imdb/train.jsonl.gz")

    def difficulty(self) -> Difficulty:
        """The arithmetic problems' difficulty these settings ask for."""
        return Difficulty(max_operands=self.max_operands, max_value=self.max_value)

    @property
    def group(self) -> str:
        """The group's folder name: policy and task, and an arithmetic difficulty other than the default
        (e.g. smollm2-135m-instruct__arithmetic-2ops-max20), so that groups of two difficulties sit side by side."""
        default = RealStudyConfig.max_operands, RealStudyConfig.max_value
        if self.task == "arithmetic" and (self.max_operands, self.max_value) != default:
            return f"{Path(self.policy).name}__arithmetic-{self.max_operands}ops-max{self.max_value}"
        return f"{Path(self.policy).name}__{self.task}"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a group: what it is and every setting its trainer gets."""

    name: str
    algo: str
    lr: float
    seed: int
    precision: str
    settings: dict


def run_name(algo: str, lr: float, seed: int, precision: str = "mixed") -> str:
    """A run folder's name; the pure-bf16 contrast is marked."""
    return f"{algo}_lr{lr:g}_s{seed}" + ("_bf16" if precision == "bf16" else "")


# --- the task's data ------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from .checkpoint import atomic_write_file

    atomic_write_file(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def arithmetic_files(cfg: RealStudyConfig) -> dict[str, list[dict]]:
    """Training problems (prompt; prompt + worked answer) and distinct held-out problems."""
    needed = cfg.train_prompts + cfg.heldout_prompts
    problems = make_problems(needed, seed=DATA_SEED, difficulty=cfg.difficulty())
    if len(problems) < needed:  # the draws missed some (validate counted enough to exist)
        raise SubnetscopeError(f"only {len(problems)} distinct problems drawn of the {needed} asked for: raise "
                               "--max_value or lower --train_prompts")
    # the generator's de-duplication leaves the last problems drawn mostly three-operand ones: shuffle first,
    # so the held-out problems come from the training distribution
    random.Random(DATA_SEED).shuffle(problems)
    train, heldout = problems[:-cfg.heldout_prompts], problems[-cfg.heldout_prompts:]
    return {"prompts": [{"prompt": p.prompt} for p in train],
            "reference": [{"prompt": p.prompt, "completion": " " + p.worked_answer} for p in train],
            "heldout": [{"prompt": p.prompt} for p in heldout]}


def imdb_files(cfg: RealStudyConfig, opening_words: int = 12, completion_words: int = 30) -> dict[str, list[dict]]:
    """Review openings as prompts (held-out ones from distinct reviews); SFT targets: what follows the
    opening in real positive reviews."""
    from .data import load_labelled_reviews

    texts, labels = load_labelled_reviews(cfg.imdb, seed=DATA_SEED, limit=cfg.train_prompts + cfg.heldout_prompts)
    words = [t.split() for t in texts]
    openings = [" ".join(w[:opening_words]) for w in words]
    reference = [{"prompt": " ".join(w[:opening_words]), "completion": " " + " ".join(
        w[opening_words:opening_words + completion_words])} for w, y in zip(words, labels)
        if y == 1 and len(w) >= opening_words + completion_words]
    return {"prompts": [{"prompt": o} for o in openings[:-cfg.heldout_prompts]], "reference": reference,
            "heldout": [{"prompt": o} for o in openings[-cfg.heldout_prompts:]]}


def data_settings(cfg: RealStudyConfig) -> dict:
    """The settings the task's data is made from."""
    names = ("max_value", "max_operands", "train_prompts", "heldout_prompts") if cfg.task == "arithmetic" else (
        "train_prompts", "heldout_prompts")
    return {name: getattr(cfg, name) for name in names}


def check_data_settings(cfg: RealStudyConfig, out: Path) -> None:
    """Refuse, in one line, a call whose data settings differ from those the group's kept data was made
    with: the group folder does not name the prompt counts, and kept data would silently win."""
    recorded = out / "data" / "settings.json"
    if recorded.is_file():
        kept, asked = json.loads(recorded.read_text()), data_settings(cfg)
        changed = [f"--{k} {kept.get(k)} (this call {v})" for k, v in asked.items() if kept.get(k) != v]
        if changed:
            raise SubnetscopeError(f"{out} holds task data made with {', '.join(changed)}: pass another "
                                   "--output_dir, or the same settings to resume")


def write_task_files(cfg: RealStudyConfig, out: Path) -> dict[str, Path]:
    """The group's data files and the settings they were made with (kept when present, so a resumed study
    trains on the same data)."""
    check_data_settings(cfg, out)
    paths = {k: out / "data" / f"{k}.jsonl" for k in ("prompts", "reference", "heldout")}
    # the rows first: a refusal while making them leaves no settings.json to refuse the corrected call
    rows = None if all(p.is_file() for p in paths.values()) else (
        arithmetic_files(cfg) if cfg.task == "arithmetic" else imdb_files(cfg))
    if not (out / "data" / "settings.json").is_file():
        write_json(out / "data" / "settings.json", data_settings(cfg))
    if rows is not None:
        for key, path in paths.items():
            _write_jsonl(path, rows[key])
    return paths


# --- the runs -------------------------------------------------------------------------------------

def run_specs(cfg: RealStudyConfig, data: dict[str, Path]) -> list[RunSpec]:
    """Every main run: each algorithm at its usual lr and at the shared lr, every seed; then the
    pure-bf16 GRPO contrast."""
    common = {"policy": cfg.policy, "reward": TASK_REWARD[cfg.task], "dataset": str(data["prompts"]),
              "max_steps": cfg.max_steps, "save_every": cfg.save_every, "save_total_limit": 1,
              "batch_size": cfg.batch_size, "max_prompt_tokens": 128, "max_new_tokens": cfg.max_new_tokens,
              "device": cfg.device, "view_dtype": VIEW}
    if cfg.chat_template is not None:
        common["chat_template"] = cfg.chat_template
    per_algo = {
        "grpo": {"group_size": cfg.group_size, "eval_every": cfg.max_steps, "no_tqdm": True},
        "ppo": {"mini_batch_size": min(8, cfg.batch_size), "eval_every": cfg.max_steps, "no_tqdm": True},
        "dpo": {"task": "dpo", "candidates": cfg.group_size, "max_prompts": 1024},
        "sft": {"task": "sft", "sft_data": "completions", "dataset": str(data["reference"]), "max_prompts": 4096},
        "rft": {"task": "sft", "sft_data": "samples", "candidates": cfg.group_size, "max_prompts": 1024,
                "min_reward": RFT_MIN_REWARD[cfg.task] if cfg.rft_min_reward is None else cfg.rft_min_reward},
    }
    specs = []
    for algo in cfg.algos:
        for lr in dict.fromkeys([USUAL_LR[algo], cfg.shared_lr]):
            for seed in cfg.seeds:
                specs.append(RunSpec(run_name(algo, lr, seed), algo, lr, seed, cfg.precision,
                                     {**common, **per_algo[algo], "lr": lr, "seed": seed,
                                      "precision": cfg.precision}))
    if cfg.contrast and "grpo" in cfg.algos:
        lr, seed = USUAL_LR["grpo"], cfg.seeds[0]
        specs.append(RunSpec(run_name("grpo", lr, seed, "bf16"), "grpo", lr, seed, "bf16",
                             {**common, **per_algo["grpo"], "lr": lr, "seed": seed, "precision": "bf16"}))
    return specs


def train(spec: RunSpec, folder: Path) -> None:
    """Train (or resume) one run with the trainer its algorithm uses."""
    settings = {**spec.settings, "output_dir": str(folder), "resume": folder.exists()}
    if spec.algo in ("sft", "rft", "dpo"):
        from .baselines import BaselineConfig, train_baseline

        train_baseline(BaselineConfig(**settings))
    elif spec.algo == "grpo":
        from .grpo import GRPOConfig, GRPOTrainer

        GRPOTrainer(GRPOConfig(**settings)).train()
    else:
        from .ppo import PPOConfig, PPOTrainer

        PPOTrainer(PPOConfig(**settings)).train()


def density_curve(folder: Path) -> list[dict]:
    """The tracked share changed at each logged step (view dtype; the fp32 masters' beside it under
    mixed precision), from the run's own metrics file."""
    path = next((folder / f for f in ("metrics.jsonl", "subnet_metrics.jsonl") if (folder / f).is_file()), None)
    if path is None:
        return []
    curve = []
    for record in read_metrics(path):
        if "changed/exact" in record:
            row = {"step": record["step"], **{r: record.get(f"changed/{r}") for r in RULES}}
            row.update({f"master_{r}": record[f"changed_master/{r}"] for r in RULES
                        if f"changed_master/{r}" in record})
            if "reward/mean" in record:
                row["reward"] = record["reward/mean"]
            curve.append(row)
    return curve


@torch.no_grad()
def heldout_score(model_dir: str, prompts: list[str], reward: str, max_new_tokens: int, device: str,
                  chat_template: bool | None = None, batch: int = 64) -> float:
    """Mean reward of greedy completions of the held-out prompts (for arithmetic: accuracy)."""
    from .data import chat_prompts
    from .models import load_causal_lm, load_tokenizer
    from .rewards import build_reward, score_rollout
    from .sampling import generate

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, torch.bfloat16 if device.startswith("cuda") else torch.float32).to(device).eval()
    templated = (chat_template if chat_template is not None else bool(getattr(tokenizer, "chat_template", None)))
    reward_fn = build_reward(reward, "", device)
    scores = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        seen = chat_prompts(tokenizer, chunk) if templated else chunk
        rollout = generate(model, tokenizer, seen, torch.arange(len(chunk)), seed=0, step=0,
                           max_new_tokens=max_new_tokens, greedy=True)
        scores.append(score_rollout(reward_fn, chunk, rollout))
    return float(torch.nanmean(torch.cat(scores)))


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def measure(spec: RunSpec, folder: Path, heldout: Path, device: str) -> dict:
    """A finished run's summary: changed share (bf16 view) under each rule, the density curve, per-layer
    and per-module changed shares, update rank, held-out score after training."""
    from .engine import analyze_pair, iter_block_table
    from .report import module_rows, rank_summary

    pair = analyze_pair(open_checkpoint(str(folder / "base")), open_checkpoint(str(folder / "final")),
                        ChangeRules(), device=device, rank=True, progress=False, view_dtype=VIEW)
    ranks = rank_summary(pair) or {}
    layers = [{k: v for k, v in row.items() if k in ("block", "numel", *RULES) or k.endswith("_fraction")}
              for row in iter_block_table(pair)]
    modules = [{k: v for k, v in row.items() if k in ("module", "numel", *RULES) or k.endswith("_fraction")}
               for row in module_rows(pair)]
    return {"run": spec.name, "algo": spec.algo, "lr": spec.lr, "seed": spec.seed, "precision": spec.precision,
            "device_name": device_name(device), "numel": pair.numel,
            **{f"changed_{r}": pair.fraction(r) for r in RULES},
            "rank_percent_mean": ranks.get("mean_percent"), "rank_percent_min": ranks.get("min_percent"),
            "heldout_after": heldout_score(str(folder / "final"), read_prompts(heldout), spec.settings["reward"],
                                           spec.settings["max_new_tokens"], device,
                                           spec.settings.get("chat_template")),
            "curve": density_curve(folder), "layers": layers, "modules": modules}


def run_and_measure(spec: RunSpec, folder: Path, heldout: Path, device: str) -> dict:
    """Train, measure, and keep the summary; the heavy step folders go once it is written."""
    done = folder / SUMMARY
    if done.is_file():
        return json.loads(done.read_text())
    start = time.time()
    train(spec, folder)
    summary = {**measure(spec, folder, heldout, device), "wall_seconds": time.time() - start}
    write_json(done, summary)
    drop_resume_state(folder)
    return summary


def drop_resume_state(folder: Path) -> int:
    """Delete what only a resume needs from a finished run's checkpoints (a study of 24 runs of a 135M
    model otherwise fills a 64 GB disk); returns the bytes freed."""
    freed = 0
    from .rundir import RunDir

    for checkpoint in RunDir(folder).steps():
        for name in RESUME_ONLY:
            path = checkpoint.path / name
            if path.is_file():
                freed += path.stat().st_size
                path.unlink()
    return freed


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def _resolved_device(device: str) -> str:
    return "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


class RunProcess(NamedTuple):
    """A run process run_all is waiting for: its run, the GPU it was given (None: no choice), and where this
    attempt's output begins in the run's log."""

    spec: RunSpec
    process: subprocess.Popen
    gpu: str | None
    log_offset: int


def run_all(specs: list[RunSpec], out: Path, heldout: Path, cfg: RealStudyConfig, log=print,
            follow_up: Callable[[str], RunSpec | None] = lambda name: None) -> dict[str, dict]:
    """Every run, `cfg.jobs` at a time as processes (or in this process with jobs=0), spread over the
    visible GPUs (each process sees one); a failed run is logged with its error file and the others go on,
    except one that ran out of GPU memory or disk space: it is queued again (up to OUT_OF_ROOM_RETRIES times; it
    resumes from its last checkpoint) and from then on each GPU gets no more runs at a time than it held without
    running out.
    `follow_up(name)` gives a run to start as soon as run `name` has finished (it goes first in the queue):
    the subnetwork rerun needs its full run's mask, and waiting for every other run left a GPU idle."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    pending = [s for s in specs if not (runs / s.name / SUMMARY).is_file()]
    # follow-ups of runs finished in an earlier call go first, as they would have then
    queue = [f for s in specs if s not in pending and (f := follow_up(s.name)) is not None
             and not (runs / f.name / SUMMARY).is_file()] + pending
    device = _resolved_device(cfg.device)
    if cfg.jobs == 0:
        while queue:
            spec = queue.pop(0)
            log(f"{spec.name}: running")
            run_and_measure(spec, runs / spec.name, heldout, device)
            queue[:0] = [f for f in [follow_up(spec.name)] if f is not None]
    else:
        gpus = visible_gpus() if device == "cuda" else []
        env = {**_child_env(), **threads_per_run(cfg.jobs)}
        limit, retries = cfg.jobs, {}
        active: list[RunProcess] = []
        while queue or active:
            while queue and len(active) < limit:
                spec = queue.pop(0)
                spec_file = runs / f"{spec.name}.spec.json"
                write_json(spec_file, {**asdict(spec), "heldout": str(heldout), "device": device})
                gpu = least_busy(gpus, [a.gpu for a in active]) if len(gpus) > 1 else None
                log_path = runs / f"{spec.name}.log"
                offset = log_path.stat().st_size if log_path.is_file() else 0
                with open(log_path, "a") as log_file:  # the child keeps its own descriptor
                    active.append(RunProcess(spec, subprocess.Popen(
                        [sys.executable, "-m", "subnetscope.real_study", str(spec_file)], stdout=log_file,
                        stderr=subprocess.STDOUT, env={**env, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}),
                        gpu, offset))
                log(f"{spec.name}: started" + (f" on GPU {gpu}" if gpu is not None else ""))
            time.sleep(2)
            load = Counter(a.gpu for a in active)  # runs on each GPU (None: no GPU) as this round began
            out_of_room_now: Counter = Counter()
            for item in [a for a in active if a.process.poll() is not None]:
                active.remove(item)
                spec, finished = item.spec, item.process.returncode == 0
                room = None if finished else out_of_room(runs / f"{spec.name}.log", item.log_offset)
                if room is not None and retries.get(spec.name, 0) < OUT_OF_ROOM_RETRIES:
                    retries[spec.name] = retries.get(spec.name, 0) + 1
                    out_of_room_now[item.gpu] += 1
                    limit = min(limit, fitting_limit(load[item.gpu] - out_of_room_now[item.gpu], len(gpus)))
                    queue.append(spec)
                    log(f"{spec.name}: out of {room}; queued again to resume from its last checkpoint, "
                        f"{limit} run(s) at a time from now on")
                    continue
                log(f"{spec.name}: " + ("done" if finished else f"FAILED, see runs/{spec.name}.log"))
                queue[:0] = [f for f in [follow_up(spec.name) if finished else None] if f is not None]
    return finished_summaries(specs, out)


def fitting_limit(fitted_on_gpu: int, n_gpus: int) -> int:
    """Runs at a time once a GPU held only `fitted_on_gpu` of its runs: that many on every GPU (runs go to the
    least busy GPU, so none gets more), at least one."""
    return max(1, fitted_on_gpu) * max(1, n_gpus)


def out_of_room(log_path: Path, offset: int) -> str | None:
    """What a run process ran out of ("GPU memory" or "disk space"), from the error that ended this attempt
    (its log from `offset`), or None: a failure of the moment's load (the other runs' memory, their checkpoints
    on the disk), not of the run, so it is worth another try once fewer run beside it."""
    if not log_path.is_file():
        return None
    with open(log_path, "rb") as f:
        f.seek(offset)
        error = final_error(f.read().decode("utf-8", "replace"))
    # the caching allocator's OutOfMemoryError; a CUDA context, cuBLAS handle or kernel launch that finds the
    # GPU full raises "CUDA error: out of memory" (RuntimeError, AcceleratorError) instead
    if any(sign in error for sign in ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory")):
        return "GPU memory"
    # rundir's refusal to write a checkpoint the disk cannot hold; an OSError of a write it did not foresee
    if any(sign in error for sign in ("no space left on the disk for", "No space left on device")):
        return "disk space"
    return None


def final_error(log: str) -> str:
    """The exception that ended a process: the unindented lines of its log's last traceback after the frames
    (a warning that mentions a full disk or GPU earlier in the log is not it), else its last non-empty line."""
    head = "Traceback (most recent call last):"
    if head in log:
        tail = log[log.rindex(head) + len(head):].splitlines()
        return "\n".join(line for line in tail if line.strip() and not line[0].isspace())
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def threads_per_run(jobs: int) -> dict[str, str]:
    """CPU threads for each of `jobs` run processes: the cores shared out, unless OMP_NUM_THREADS is set.
    Each process's torch otherwise starts a thread per core, and 16 runs on 32 cores ran slower for it."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, usable_cores() // max(jobs, 1)))}


def usable_cores() -> int:
    """The cores this process may run on (a container's affinity, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """The GPUs run processes may use: CUDA_VISIBLE_DEVICES's entries when it is set, else every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def least_busy(gpus: list[str], busy: list[str | None]) -> str:
    """The GPU running the fewest of `busy` (the first such in `gpus`): runs spread evenly over the GPUs."""
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def _child_env() -> dict[str, str]:
    """A run process's environment: this package importable from any folder, installed or not."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def finished_summaries(specs: list[RunSpec], out: Path) -> dict[str, dict]:
    """The summaries of the runs of `specs` that finished, by run name."""
    runs = out / "runs"
    return {s.name: json.loads((runs / s.name / SUMMARY).read_text()) for s in specs
            if (runs / s.name / SUMMARY).is_file()}


def _run_from_file(path: str) -> int:
    """Entry point of one run's process: the spec file written by run_all."""
    raw = json.loads(Path(path).read_text())
    heldout, device = Path(raw.pop("heldout")), raw.pop("device")
    spec = RunSpec(**raw)
    run_and_measure(spec, Path(path).parent / spec.name, heldout, device)
    return 0


# --- the group's report ---------------------------------------------------------------------------

def overlap_rows(summaries: dict[str, dict], runs: Path, device: str, kept: Path | None = None) -> list[dict]:
    """o1, o2 and Jaccard (with their chance levels) of every seed pair of each algorithm and lr. A pair
    whose checkpoints are not here (results rebuilt from the summaries alone) keeps its rows from `kept`,
    the overlap.csv written where they were."""
    from .engine import analyze_overlap
    from .real_study_report import read_csv

    earlier = read_csv(kept) if kept is not None else []
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for s in summaries.values():
        if s["precision"] != "bf16":  # the pure-bf16 contrast has one seed
            groups.setdefault((s["algo"], s["lr"]), []).append(s)
    for (algo, lr), members in groups.items():
        for a, b in itertools.combinations(sorted(members, key=lambda s: s["seed"]), 2):
            if not all((runs / s["run"] / d).is_dir() for s in (a, b) for d in ("base", "final")):
                rows += [r for r in earlier if (r["algo"], r["lr"], r["seed_1"], r["seed_2"]) == (
                    algo, lr, a["seed"], b["seed"])]
                continue
            result = analyze_overlap(open_checkpoint(str(runs / a["run"] / "base")),
                                     open_checkpoint(str(runs / a["run"] / "final")),
                                     open_checkpoint(str(runs / b["run"] / "final")), ChangeRules(), device=device,
                                     progress=False, view_dtype=VIEW)
            rows += [{"algo": algo, "lr": lr, "seed_1": a["seed"], "seed_2": b["seed"], "rule": r,
                      **result.global_[r]} for r in RULES]
    return rows


def subnetwork_source(cfg: RealStudyConfig, specs: list[RunSpec]) -> RunSpec | None:
    """The full run the subnetwork rerun repeats: GRPO, first seed, usual lr, the main precision."""
    return next((s for s in specs if s.algo == "grpo" and s.precision == cfg.precision and s.seed == cfg.seeds[0]
                 and s.lr == USUAL_LR["grpo"]), None)


def subnetwork_spec(full: RunSpec, out: Path) -> RunSpec:
    """GRPO seed 0 again, confined to the weights its (finished) full run ever changed; writes that mask."""
    from .checkpoint import read_ever_changed
    from .masks import MaskSet, model_fingerprint, save_masks
    from .runstate import read_run_config

    full_dir = out / "runs" / full.name
    mask_path = out / "subnetwork_mask.safetensors"
    # written again from the finished run each time (the same bytes on a resume): a mask left by an
    # earlier, unfinished attempt of the full run is never reused
    step, masks = read_ever_changed(full_dir)  # the tracker state: what drop_resume_state keeps
    save_masks(mask_path, MaskSet(masks, {"method": "ever_changed", "source_run": str(full_dir.resolve()),
                                          "step": step},
                                  model_fingerprint(read_run_config(full_dir)["parameters"])))
    return RunSpec("subnetwork_" + full.name, "grpo", full.lr, full.seed, full.precision,
                   {**full.settings, "update_mask": str(mask_path)})


def subnetwork_result(full: RunSpec | None, out: Path) -> dict | None:
    """The subnetwork rerun against its full run: the share of weights identical and both held-out scores
    (None until both have finished)."""
    if full is None:
        return None
    full_dir, sub_dir = out / "runs" / full.name, out / "runs" / ("subnetwork_" + full.name)
    if not ((full_dir / SUMMARY).is_file() and (sub_dir / SUMMARY).is_file()):
        return None
    comparison = json.loads((sub_dir / "subnetwork_comparison.json").read_text())
    summary, full_summary = (json.loads((d / SUMMARY).read_text()) for d in (sub_dir, full_dir))
    return {"seed": full.seed, "lr": full.lr, "identical_fraction": comparison["identical_fraction"],
            "heldout_subnetwork": summary["heldout_after"], "heldout_full": full_summary["heldout_after"],
            "changed_exact_subnetwork": summary["changed_exact"], "changed_exact_full": full_summary["changed_exact"]}


def precision_split(summaries: dict[str, dict], cfg: RealStudyConfig) -> dict | None:
    """GRPO seed 0: weights changed at the bf16 view beside the fp32 masters that changed, and with pure
    bf16 weights (the last point of each density curve)."""
    lr, seed = USUAL_LR["grpo"], cfg.seeds[0]
    mixed = summaries.get(run_name("grpo", lr, seed, cfg.precision))
    bf16 = summaries.get(run_name("grpo", lr, seed, "bf16"))
    if mixed is None or not mixed["curve"] or "master_exact" not in mixed["curve"][-1]:
        return None
    last = mixed["curve"][-1]
    return {"seed": seed, "lr": lr, "precision": cfg.precision, "mixed_bf16_view": {r: last[r] for r in RULES},
            "mixed_fp32_master": {r: last[f"master_{r}"] for r in RULES},
            "pure_bf16": {r: bf16["curve"][-1][r] for r in RULES} if bf16 and bf16["curve"] else None}


def result_rows(summaries: dict[str, dict], before: float, cfg: RealStudyConfig) -> list[dict]:
    return [{"policy": Path(cfg.policy).name, "task": cfg.task, **{k: v for k, v in s.items()
             if k not in ("curve", "layers", "modules")}, "heldout_before": before}
            for s in summaries.values()]


def layer_rows(summaries: dict[str, dict], cfg: RealStudyConfig) -> list[dict]:
    """Per run and block: the share changed, with the block's relative depth (0 = first, 1 = last)."""
    rows = []
    for s in summaries.values():
        blocks = [r for r in s["layers"] if r["block"] != "outside"]
        depth = max(len(blocks) - 1, 1)
        rows += [{"policy": Path(cfg.policy).name, "task": cfg.task, "run": s["run"], "algo": s["algo"],
                  "lr": s["lr"], "seed": s["seed"], "precision": s["precision"], "block": r["block"],
                  "relative_depth": (int(r["block"]) / depth) if r["block"] != "outside" else None,
                  "numel": r["numel"], **{f"changed_{x}": r[f"{x}_fraction"] for x in RULES}} for r in s["layers"]]
    return rows


def run_group(cfg: RealStudyConfig, log=print, command: str = "") -> Path:
    """Run (or resume) one group and write its small result files; returns the group's results folder."""
    cfg.validate()
    out = Path(cfg.output_dir) / cfg.group
    data = write_task_files(cfg, out)
    device = _resolved_device(cfg.device)
    before_file = out / "heldout_before.json"
    if not before_file.is_file():
        score = heldout_score(cfg.policy, read_prompts(data["heldout"]), TASK_REWARD[cfg.task], cfg.max_new_tokens,
                              device, cfg.chat_template)
        write_json(before_file, {"heldout_before": score})
    before = json.loads(before_file.read_text())["heldout_before"]
    log(f"{cfg.group}: held-out score before training {before:.4f}")
    start = time.time()
    specs = run_specs(cfg, data)
    full = subnetwork_source(cfg, specs) if cfg.subnetwork else None

    def follow_up(name: str) -> RunSpec | None:
        return subnetwork_spec(full, out) if full is not None and name == full.name else None

    summaries = (run_all(specs, out, data["heldout"], cfg, log, follow_up) if cfg.train
                 else finished_summaries(specs, out))
    subnet = subnetwork_result(full, out)
    missing = [s.name for s in specs if s.name not in summaries] + (
        ["subnetwork_" + full.name] if full is not None and subnet is None else [])
    results = Path(cfg.results_dir) / cfg.group
    write_csv(results / "results.csv", result_rows(summaries, before, cfg))
    write_csv(results / "overlap.csv", overlap_rows(summaries, out / "runs", device, kept=results / "overlap.csv"))
    write_csv(results / "layers.csv", layer_rows(summaries, cfg))
    write_csv(results / "modules.csv", [{"run": s["run"], "algo": s["algo"], "lr": s["lr"], "seed": s["seed"], **m}
                                        for s in summaries.values() for m in s["modules"]])
    write_csv(results / "curves.csv", [{"run": s["run"], "algo": s["algo"], "lr": s["lr"], "seed": s["seed"],
                                        "precision": s["precision"], **c} for s in summaries.values()
                                       for c in s["curve"]])
    write_json(results / "group.json", {
        "config": asdict(cfg), "command": command, "heldout_before": before, "subnetwork": subnet, "note": cfg.note,
        "precision": precision_split(summaries, cfg), "missing_runs": missing,
        "device": device_name(device) if cfg.train else ", ".join(sorted({s.get("device_name", "not recorded")
                                                                            for s in summaries.values()})),
        "wall_seconds_this_call": time.time() - start,
        "run_wall_seconds": {s["run"]: s.get("wall_seconds") for s in summaries.values()}})
    return results


if __name__ == "__main__":
    sys.exit(_run_from_file(sys.argv[1]))
