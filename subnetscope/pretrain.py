"""The run matrix's `pretrain` task: continued causal-language-model training on plain text, the third
column of the research plan's "RL vs SFT vs pretrain" comparison (how sparse is an update that just
keeps doing what the model was pretrained to do?).

The text (`dataset`: imdb by name, a local json/jsonl/csv file's text column, or a .txt file such as
Tiny Shakespeare, read as one document) is cut into consecutive windows of `seq_len` tokens and
trained with TRL's SFTTrainer as language modelling (loss on every token), with the update tracker
attached: the run folder is a baseline's (base/, checkpoint-N/, final/, subnet_metrics.jsonl,
run_config.json), so every reader takes it unchanged. Precision, optimizers and resume are the SFT
baseline's (baselines.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .baselines import baseline_start, check_resumed, prepare_run_dir, train_and_write_final
from .config import TRL_OPTIMIZERS
from .callback import SubnetTrackerCallback
from .changes import ChangeRules
from .data import language_model_windows
from .devices import resolve_device
from .errors import SubnetscopeError
from .models import load_causal_lm, load_tokenizer
from .precision import resolve_precision
from .rl import RunConfig, precision_settings

PROMPT_SETS = ("builtin", "easy")  # RL prompt sets: openings, not text to model


@dataclass
class PretrainConfig(RunConfig):
    dataset: str = "imdb"
    seq_len: int = 128
    max_texts: int = 5000
    output_dir: str = "checkpoints/pretrain"

    @property
    def task(self) -> str:
        """The baseline helpers name the run's algorithm after it (run_config.json: PRETRAIN)."""
        return "pretrain"

    def validate(self) -> None:
        super().validate()
        self.require_counts("seq_len", "max_texts")
        if self.optimizer not in TRL_OPTIMIZERS:
            raise SubnetscopeError(f"--optimizer {self.optimizer!r}: TRL's trainers here take "
                                   f"{', '.join(TRL_OPTIMIZERS)}")
        if self.dataset in PROMPT_SETS:
            raise SubnetscopeError(f"pretrain: dataset {self.dataset!r} is a set of RL prompts, not text to model: "
                                   "use imdb or a local text file, e.g. ../shared/data/tinyshakespeare/input.txt")


def one_pass(windows: list[list[int]], config: PretrainConfig) -> list[list[int]]:
    """The windows the run trains on: as many as its steps take (every process's batches, under
    torchrun or accelerate), a seeded choice among all, so that each is seen once, as in pretraining;
    all of them, repeated, when the text is shorter."""
    import os

    needed = config.max_steps * config.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    if len(windows) <= needed:
        return windows
    chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))[:needed]
    return [windows[i] for i in sorted(chosen.tolist())]


def train_pretrain(config: PretrainConfig) -> SubnetTrackerCallback:
    """Continued language-model training with the tracker; a --resume of a finished run trains nothing."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    start = baseline_start(config)
    rules = ChangeRules(config.atol, config.eta)
    if start.finished(config.max_steps):
        return SubnetTrackerCallback(rules, topk=config.topk)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device, config.view_dtype)
    check_resumed(config, start, precision)
    tokenizer = load_tokenizer(config.policy, config.tokenizer)
    windows = one_pass(language_model_windows(config.dataset, tokenizer, config.seq_len, config.max_texts,
                                              config.seed), config)
    model = load_causal_lm(config.policy, precision.weights, vocab_size=len(tokenizer)).to(device)
    callback = SubnetTrackerCallback(rules, topk=config.topk, view_dtype=precision.view)
    args = SFTConfig(output_dir=config.output_dir, max_steps=config.max_steps, save_steps=config.save_every,
                     save_strategy="steps", per_device_train_batch_size=config.batch_size, learning_rate=config.lr,
                     lr_scheduler_type="constant", optim=TRL_OPTIMIZERS[config.optimizer], seed=config.seed,
                     logging_steps=1, report_to=["wandb"] if config.wandb else "none", use_cpu=device == "cpu",
                     bf16=precision.compute == torch.bfloat16, max_length=config.seq_len,
                     activation_checkpointing=config.gradient_checkpointing)  # TRL's default is on
    if config.wandb:
        import os

        os.environ.setdefault("WANDB_PROJECT", config.wandb)
    settings = {**asdict(config), **precision_settings(precision), "windows": len(windows)}
    prepare_run_dir(config, start, model, settings)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": windows}),
                         processing_class=tokenizer, callbacks=[callback])
    train_and_write_final(trainer, start, model, tokenizer, precision, config.output_dir)
    return callback
