"""Sparse fine-tuning of a causal LM on a text task: a pruned model trained within its mask, or
sparse LoRA on PEFT.

Methods: `masked` trains the model's own weights with W ← W⊙M, gradients masked and pruned entries
put back to zero after every step (no mask: dense fine-tuning); `lora` trains PEFT LoRA adapters
over the masked weights (see sparse_lora.py for the two modes). The run folder holds config.json,
metrics.jsonl (train/val loss, samples/s), checkpoint-N/ (trainable weights, optimizer, step;
written atomically, `--resume` continues from the newest) and final/ (the merged model). Runs are
aggregated by analyze_results.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import atomic_save_dir, latest_resumable, open_checkpoint
from .confine import ConfinedUpdates
from .data import load_task_texts, token_stream
from .devices import resolve_device
from .errors import SubnetscopeError
from .importance import prunable_tensors
from .lm import heldout_loss, lm_loss, sample_windows
from .logger import MetricsLogger
from .masks import check_masks_fit, load_masks
from .models import DTYPES, load_causal_lm, load_tokenizer
from .runstate import rng_state, set_rng_state
from .sparse_lora import LORA_MODES, add_sparse_lora, merge_sparse_lora

METHODS = ("masked", "lora")
TRAINER_STATE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class SparseFTConfig:
    """Every setting of a sparse fine-tuning run; each is a flag and a YAML key."""

    model: str = "tiny-gpt2"
    tokenizer: str | None = None
    task: str = "imdb"
    mask: str | None = None
    method: str = "masked"
    lora_mode: str = "sparse_to_dense"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    seq_len: int = 128
    batch_size: int = 8
    max_steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    dtype: str = "float32"
    max_texts: int = 20000
    val_fraction: float = 0.05
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    device: str = "auto"
    seed: int = 0
    output_dir: str = "checkpoints/sparse_ft"
    resume: bool = False
    wandb: str | None = None
    no_tqdm: bool = False

    def validate(self) -> None:
        for key in ("lora_rank", "seq_len", "batch_size", "max_steps", "max_texts", "log_every", "eval_every",
                    "eval_batches", "save_every"):
            if getattr(self, key) < 1:
                raise SubnetscopeError(f"--{key} {getattr(self, key)}: needs at least 1")
        if self.method not in METHODS:
            raise SubnetscopeError(f"--method {self.method!r}: use masked or lora")
        if self.lora_mode not in LORA_MODES:
            raise SubnetscopeError(f"--lora_mode {self.lora_mode!r}: use {' or '.join(LORA_MODES)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise SubnetscopeError("--lr must be positive and --weight_decay non-negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise SubnetscopeError(f"--val_fraction {self.val_fraction}: must be in (0, 1)")
        if self.dtype not in DTYPES:
            raise SubnetscopeError(f"--dtype {self.dtype!r}: use float32, bfloat16 or float16")


def split_tokens(texts: list[str], tokenizer, val_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams of the first (train) and last (validation) texts."""
    n_val = max(1, int(len(texts) * val_fraction))
    train, val = token_stream(texts[:-n_val], tokenizer), token_stream(texts[-n_val:], tokenizer)
    if min(len(train), len(val)) <= seq_len + 1:
        raise SubnetscopeError(f"the task has too few tokens for --seq_len {seq_len} (train {len(train)}, "
                               f"validation {len(val)}): use more --max_texts or a shorter --seq_len")
    return train, val


class SparseFTTrainer:
    def __init__(self, config: SparseFTConfig):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.run_dir = Path(config.output_dir)
        if not config.resume and (self.run_dir / "metrics.jsonl").exists():
            raise SubnetscopeError(f"{self.run_dir} holds a run already: pass --resume, or pick a new --output_dir")
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        texts = load_task_texts(config.task, limit=config.max_texts, seed=config.seed)
        self.train_tokens, self.val_tokens = split_tokens(texts, self.tokenizer, config.val_fraction, config.seq_len)
        base = load_causal_lm(config.model, DTYPES[config.dtype], vocab_size=len(self.tokenizer))
        self.mask_set = load_masks(config.mask) if config.mask else None
        masks = {}
        if self.mask_set is not None:
            check_masks_fit(self.mask_set, dict(base.named_parameters()), f"--mask {config.mask}")
            masks = self.mask_set.masks
        self.masks = masks
        torch.manual_seed(config.seed)
        self.confined = None
        if config.method == "lora":
            lora_masks = masks or {n: torch.ones(t.param.shape, dtype=torch.bool)
                                   for n, t in prunable_tensors(base).items()}
            self.model = add_sparse_lora(base, lora_masks, config.lora_mode, config.lora_rank, config.lora_alpha,
                                         config.lora_dropout).to(self.device)
            self.masks = lora_masks
        else:
            self.model = base.to(self.device)
            if masks:
                self.confined = ConfinedUpdates(dict(self.model.named_parameters()), masks)
                self.confined.project_()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        if config.resume:
            self._load_latest()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self.describe(), indent=1))
        self.logger = MetricsLogger(self.run_dir, config.wandb, asdict(config), resume_step=self.step)

    def describe(self) -> dict:
        """Settings plus what analyze_results.py groups by: model, task, method and sparsity."""
        settings = self.mask_set.settings if self.mask_set else {}
        mask_method = "dense" if not self.mask_set else "/".join(
            str(settings[k]) for k in ("method", "importance", "group") if settings.get(k))
        method = self.config.method if self.config.method == "masked" else f"lora-{self.config.lora_mode}"
        return {**asdict(self.config), "kind": "sparse_ft", "model_name": Path(self.config.model).name,
                "task_name": Path(self.config.task).name.split(".")[0], "finetune": method,
                "mask_method": mask_method, "sparsity": self._target_sparsity(),
                "trainable_parameters": sum(p.numel() for p in self.trainable.values())}

    def _target_sparsity(self) -> float:
        """The sparsity the mask was made for, else the mask's own (rounded: it is a group key)."""
        if self.mask_set is None:
            return 0.0
        return float(self.mask_set.settings.get("sparsity", round(self.mask_set.sparsity(), 6)))

    def evaluate(self) -> float:
        cfg = self.config
        return heldout_loss(self.model, self.val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches, self.device,
                            seed=20_000_003)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def train(self) -> dict:
        cfg = self.config
        self.model.train()
        bar = tqdm(range(self.step + 1, cfg.max_steps + 1), initial=self.step, total=cfg.max_steps,
                   desc=f"sparse-ft {cfg.method}", disable=cfg.no_tqdm)
        losses: list[torch.Tensor] = []
        t_start, n_samples = time.perf_counter(), 0
        for step in bar:
            inputs, targets = sample_windows(self.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed * 1_000_003 + step)
            loss = lm_loss(self.model, inputs, targets, self.device)
            loss.backward()
            if self.confined:
                self.confined.mask_gradients_()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.confined:
                self.confined.project_()
            losses.append(loss.detach())
            n_samples += cfg.batch_size
            self.step = step
            last = step == cfg.max_steps
            if step % cfg.log_every == 0 or last:
                self._sync()
                elapsed = time.perf_counter() - t_start
                metrics = {"train/loss": float(torch.stack(losses).mean()), "throughput/samples_per_s": n_samples / elapsed}
                if step % cfg.eval_every == 0 or last:
                    metrics["val/loss"] = self.evaluate()
                self.logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                losses, t_start, n_samples = [], time.perf_counter(), 0
            if step % cfg.save_every == 0 or last:
                self._save(step)
        result = self._save_final()
        self.logger.close()
        return result

    def _save(self, step: int) -> None:
        def write(tmp: Path) -> None:
            save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}, str(tmp / TRAINABLE_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)

        atomic_save_dir(self.run_dir / f"checkpoint-{step}", write)

    def _load_latest(self) -> None:
        folder = latest_resumable(self.run_dir, TRAINER_STATE)
        if folder is None:
            return
        source = open_checkpoint(str(folder / TRAINABLE_FILE))
        if set(source.names()) != set(self.trainable):
            raise SubnetscopeError(f"--resume: {folder} was written by other settings (method, mask or LoRA rank): "
                                   "resume with the same settings, or pick a new --output_dir")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(source.get(name))
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])  # dropout continues as if never interrupted

    def _save_final(self) -> dict:
        """Merge (LoRA) and mask, write final/, and report the sparsity of the masked weights."""
        val_loss = self.evaluate()
        model = merge_sparse_lora(self.model, self.masks) if self.config.method == "lora" else self.model
        params = dict(model.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in self.masks)
        total = sum(params[n].numel() for n in self.masks)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        atomic_save_dir(self.run_dir / "final", write)
        summary = {"val_loss": val_loss, "steps": self.step, "final_sparsity": zeros / total if total else 0.0}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
