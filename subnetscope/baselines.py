"""SFT and DPO baselines through TRL's trainers, with the update tracker attached as a callback.

Both start from the same policy and prompts as the RL runs. SFT trains on reference continuations:
for each prompt, the best of `candidates` samples from the initial policy under the reward
(rejection sampling), or with `sft_data="positive_reviews"` on real positive reviews of a labelled
data set (opening as prompt, what follows as completion). DPO trains on pairs from the same samples:
the best as chosen, the worst as rejected (ties dropped). The run folder holds base/ (θ0, written by
the callback), the trainer's checkpoint-N folders, and subnet_metrics.jsonl, so every analysis reads
it unchanged.

Precision (subnetscope.precision): mixed trains fp32 weights with TRL's own bf16 autocast (`bf16=True`)
and the callback judges, and writes base/, checkpoint-N/subnet.safetensors and final/, at the view
dtype; bf16 loads and updates bf16 weights (`bf16=False`: nothing to autocast); fp32 is fp32 throughout.
An instruct model's prompts become a user turn of its chat template (the completions stay as sampled).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict
from pathlib import Path

import torch

from .callback import TRACKER_FILE, SubnetTrackerCallback
from .changes import ChangeRules
from .config import SFT_DATA, TRL_OPTIMIZERS, BaselineConfig  # noqa: F401 (SFT_DATA re-exported)
from .data import chat_prompts, load_prompts
from .errors import SubnetscopeError
from .models import load_causal_lm, load_tokenizer
from .precision import Precision, resolve_precision
from .rewards import build_reward, score_rollout
from .rl import RunStart, check_run_start, precision_settings
from .rundir import HEADER_BYTES, TRL_PREFIX, RunDir, save_model, tensor_bytes
from .runstate import describe_changes, record_resume, settings_changes, write_new_run_config
from .sampling import generate

METRICS_FILE = "subnet_metrics.jsonl"
SAMPLE_BATCH = 256  # sequences generated at once for the SFT/DPO data (1024 prompts x 4 at once took 27 GB)
# a complete checkpoint-N of TRL's trainers: weights, the trainer's state, and the tracker's (saved last)
CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_FILES = ("trainer_state.json", TRACKER_FILE)


@torch.no_grad()
def scored_samples(model, tokenizer, prompts: list[str], reward_fn, candidates: int, seed: int,
                   max_new_tokens: int, temperature: float,
                   model_text: list[str] | None = None) -> list[list[tuple[float, str]]]:
    """`candidates` samples per prompt from `model`, each with its reward, best first. The model sees
    `model_text` (the prompts in its chat template; default the prompts), the reward the plain prompts."""
    repeated = [p for p in prompts for _ in range(candidates)]
    seen = [p for p in (model_text or prompts) for _ in range(candidates)]
    rewards, texts = [], []
    for lo in range(0, len(repeated), SAMPLE_BATCH):  # each sample's noise is keyed by its row: chunks change nothing
        rows = torch.arange(lo, min(lo + SAMPLE_BATCH, len(repeated)))
        rollout = generate(model, tokenizer, seen[lo:lo + SAMPLE_BATCH], rows, seed=seed, step=0,
                           max_new_tokens=max_new_tokens, temperature=temperature)
        rewards += score_rollout(reward_fn, repeated[lo:lo + SAMPLE_BATCH], rollout).tolist()
        texts += rollout.texts
    out = []
    for i in range(len(prompts)):
        group = [(r, t) for r, t in zip(rewards[i * candidates:(i + 1) * candidates],
                                        texts[i * candidates:(i + 1) * candidates]) if not math.isnan(r)]
        out.append(sorted(group, key=lambda x: -x[0]))
    return out


def trl_prompts(tokenizer, templated: list[str]) -> list[str]:
    """Templated prompts as TRL's trainers take them: they tokenize text with the tokenizer's special
    tokens, so a template that writes the BOS token itself (Gemma's, Llama's) would get it twice."""
    bos = tokenizer.bos_token
    if not bos or tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return templated
    return [p.removeprefix(bos) for p in templated]


def sft_records(prompts: list[str], samples: list[list[tuple[float, str]]],
                min_reward: float | None = None) -> dict[str, list[str]]:
    """Each prompt's best sample as its target; with `min_reward` only samples scoring at least that
    (rejection sampling), refused in one line when none does."""
    keep = [(p, s[0][1]) for p, s in zip(prompts, samples) if s and (min_reward is None or s[0][0] >= min_reward)]
    if not keep:
        raise SubnetscopeError(f"no sample of the initial policy scored at least --min_reward {min_reward}: lower it "
                               "or raise --candidates")
    return {"prompt": [p for p, _ in keep], "completion": [" " + c.strip() for _, c in keep]}


def completion_records(spec: str, limit: int) -> dict[str, list[str]]:
    """The prompt/completion pairs of a local data file (reference answers), in file order."""
    from .data import _load_records

    records = _load_records(spec)
    missing = {"prompt", "completion"} - set(records.column_names)
    if missing:
        raise SubnetscopeError(f"{spec} has no {' or '.join(sorted(missing))} column: --sft_data completions needs "
                               "prompt and completion fields")
    records = records.select(range(min(limit, len(records))))
    return {"prompt": list(records["prompt"]), "completion": list(records["completion"])}


def positive_review_records(spec: str, tokenizer, limit: int, prompt_tokens: int, completion_tokens: int,
                            seed: int) -> dict[str, list[str]]:
    """SFT on real positive reviews: each one's opening as the prompt, the words after it as the completion."""
    from .data import load_labelled_reviews

    texts, labels = load_labelled_reviews(spec, seed)
    prompts, completions = [], []
    for text in (t for t, y in zip(texts, labels) if y == 1):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_tokens + completion_tokens:
            continue
        prompts.append(tokenizer.decode(ids[:prompt_tokens]))
        completions.append(tokenizer.decode(ids[prompt_tokens:prompt_tokens + completion_tokens]))
        if len(prompts) == limit:
            break
    if not prompts:
        raise SubnetscopeError(f"{spec} has no positive review long enough for the prompt and completion lengths")
    return {"prompt": prompts, "completion": completions}


def dpo_records(prompts: list[str], samples: list[list[tuple[float, str]]]) -> dict[str, list[str]]:
    keep = [(p, s[0][1], s[-1][1]) for p, s in zip(prompts, samples) if len(s) >= 2 and s[0][0] > s[-1][0]]
    if not keep:
        raise SubnetscopeError("no prompt got samples of different reward, so DPO has no pairs: "
                               "raise --candidates or --max_new_tokens, or use another reward")
    return {"prompt": [k[0] for k in keep], "chosen": [" " + k[1].strip() for k in keep],
            "rejected": [" " + k[2].strip() for k in keep]}


def baseline_start(config: BaselineConfig) -> RunStart:
    """Everything a baseline run could refuse before loading a model or writing a byte (see
    rl.check_run_start), with TRL's checkpoint-N folders as its checkpoints."""
    return check_run_start(config, config.task.upper(), weights=CHECKPOINT_WEIGHTS, required=CHECKPOINT_FILES)


def check_resumed(config: BaselineConfig, start: RunStart, precision: Precision) -> None:
    """A resumed run keeps its precision as resolved (`auto` may resolve otherwise on another machine)."""
    if start.saved is None:
        return
    changes = settings_changes(start.saved["settings"], precision_settings(precision))
    if changes and not config.allow_changed_settings:
        raise SubnetscopeError(f"--resume: {config.output_dir} was trained with another precision: "
                               f"{describe_changes(changes)} (as --precision {config.precision} resolves here): pass "
                               "the run's --precision and --view_dtype, or --allow_changed_settings")


def prepare_run_dir(config: BaselineConfig, start: RunStart, model: torch.nn.Module, settings: dict) -> None:
    """As RLTrainer's: killed writes' leftovers go, and run_config.json is written (a new run) or
    brought up to date (a resumed one)."""
    run_dir = Path(config.output_dir)
    removed = RunDir(run_dir, TRL_PREFIX).clean_stale_temps()
    if removed:
        print(f"removed what killed writes left in {run_dir}: {', '.join(removed)}")
    for note in start.point.notes():
        print(f"note: {note}")
    if start.saved is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_new_run_config(run_dir, config.task.upper(), settings, model)
    else:
        record_resume(run_dir, start.saved, settings, start.point.step)


def build_records(config: BaselineConfig, model, tokenizer, precision: Precision, device: str,
                  templated: bool) -> dict[str, list[str]]:
    """The trainer's data set: prompts (in the chat template when `templated`) with SFT targets or DPO pairs."""
    def model_text(prompts: list[str]) -> list[str]:
        return chat_prompts(tokenizer, prompts) if templated else prompts

    if config.task == "sft" and config.sft_data == "positive_reviews":
        records = positive_review_records(config.dataset, tokenizer, config.max_prompts, config.max_prompt_tokens,
                                          config.max_new_tokens, config.seed)
        return {**records, "prompt": trl_prompts(tokenizer, model_text(records["prompt"]))}
    if config.task == "sft" and config.sft_data == "completions":
        records = completion_records(config.dataset, config.max_prompts)
        return {**records, "prompt": trl_prompts(tokenizer, model_text(records["prompt"]))}
    reward_fn = build_reward(config.reward, config.reward_model, device)
    prompts = load_prompts(config.dataset, tokenizer, config.max_prompt_tokens, seed=config.seed)[: config.max_prompts]
    seen = model_text(prompts)
    with precision.autocast(device):
        samples = scored_samples(model, tokenizer, prompts, reward_fn, config.candidates, config.seed,
                                 config.max_new_tokens, config.temperature, model_text=seen)
    seen = trl_prompts(tokenizer, seen)
    return sft_records(seen, samples, config.min_reward) if config.task == "sft" else dpo_records(seen, samples)


def train_baseline(config: BaselineConfig) -> SubnetTrackerCallback:
    """Build the data set from the initial policy's samples, then train with TRL and the tracker. A
    --resume of a finished run trains nothing (the callback then has no history)."""
    import datasets
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    start = baseline_start(config)
    rules = ChangeRules(config.atol, config.eta)
    if start.finished(config.max_steps):
        return SubnetTrackerCallback(rules, topk=config.topk)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else (
        "cpu" if config.device == "auto" else config.device)
    precision = resolve_precision(config.precision, device, config.view_dtype)
    check_resumed(config, start, precision)
    callback = SubnetTrackerCallback(rules, topk=config.topk, view_dtype=precision.view)
    tokenizer = load_tokenizer(config.policy, config.tokenizer)
    model = load_causal_lm(config.policy, precision.weights, vocab_size=len(tokenizer)).to(device)
    if start.saved is not None:
        RunDir(config.output_dir, TRL_PREFIX).check_resumable(model, start.saved)
    templated = config.chat_template and bool(getattr(tokenizer, "chat_template", None))
    data = datasets.Dataset.from_dict(build_records(config, model, tokenizer, precision, device, templated))
    # TRL's bf16 flag is autocast: on for mixed (fp32 weights); bf16 weights are updated directly without it
    common = dict(output_dir=config.output_dir, max_steps=config.max_steps, save_steps=config.save_every,
                  save_strategy="steps", save_total_limit=config.save_total_limit,
                  per_device_train_batch_size=config.batch_size, learning_rate=config.lr,
                  lr_scheduler_type="constant",  # like our RL loops: runs compare at one lr, and resume keeps it
                  optim=TRL_OPTIMIZERS[config.optimizer], seed=config.seed, logging_steps=1,
                  report_to=["wandb"] if config.wandb else "none", use_cpu=device == "cpu",
                  bf16=precision.compute == torch.bfloat16,
                  gradient_checkpointing=config.gradient_checkpointing)
    if config.wandb:
        import os

        os.environ.setdefault("WANDB_PROJECT", config.wandb)
    settings = {**asdict(config), **precision_settings(precision), "chat_template_applied": templated}
    prepare_run_dir(config, start, model, settings)
    if config.task == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                             callbacks=[callback])
    else:
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), train_dataset=data,
                             args=DPOConfig(beta=config.dpo_beta, **common), processing_class=tokenizer,
                             callbacks=[callback])
    train_and_write_final(trainer, start, model, tokenizer, precision, config.output_dir)
    return callback


def train_and_write_final(trainer, start: RunStart, model: torch.nn.Module, tokenizer, precision: Precision,
                          output_dir: str) -> None:
    """Train a TRL trainer from the run's resume point (if any), then write final/ at the view dtype."""
    resume_from = start.point.folder
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    def write_final(tmp: Path) -> None:
        save_model(model, tmp, precision.view)
        tokenizer.save_pretrained(tmp)

    RunDir(output_dir, TRL_PREFIX).finalize(write_final, tensor_bytes(model.parameters()) + HEADER_BYTES)
