"""Train a GPT-2 from a small config on a text file while magnitude-pruning it on a schedule.

nanoGPT's recipe (random windows of the token stream, AdamW) plus `pruning.py`'s schedule and its
three phases: pruned weights may revive between prunings (the revival rate measures it), and the
mask is held from the last pruning on (`hold_final`, default on), so the final model has the target
sparsity; `hard_mask` holds it from the first pruning. The run folder holds metrics.jsonl,
checkpoint-N/ (model.safetensors + trainer_state.pt, written atomically) and final/; `--resume`
continues from the newest checkpoint with identical batches.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from .checkpoint import open_checkpoint
from .config import PruneConfig
from .devices import resolve_device
from .errors import SubnetscopeError
from .lm import heldout_loss, lm_loss, sample_windows
from .logger import MetricsLogger
from .models import tokenizer_from
from .outputs import check_output_dir
from .pruning import (
    PruneSchedule,
    magnitude_prune_,
    prunable_weights,
    reapply_masks_,
    revival_rate,
    slope,
    structure_metrics,
    zeroed_grad_norms,
)
from .report import write_json
from .rundir import TRL_PREFIX, RunDir
from .seeds import STEP_STRIDE, stream_seed

TRAINER_STATE = "trainer_state.pt"
VAL_SEED = 10_000_019  # the validation windows: the same every evaluation and every run
MASKS_FILE = "prune_masks.safetensors"
SLOPE_WINDOW = 5


def load_token_splits(path: str, tokenizer, val_fraction: float,
                      block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text's GPT-2 tokens, split into train (first part) and validation (the rest); the file's existence
    is PruneConfig.validate's check."""
    ids = torch.tensor(tokenizer(Path(path).read_text(encoding="utf-8", errors="replace"))["input_ids"],
                       dtype=torch.long)
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    if min(len(train), len(val)) <= block_size:
        raise SubnetscopeError(
            f"{path} has {len(ids)} tokens: too short for windows of block_size {block_size} in both splits "
            f"(train {len(train)}, val {len(val)}); use a longer text or a smaller block_size"
        )
    return train, val


class PruneTrainer:
    def __init__(self, config: PruneConfig):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.tokenizer = tokenizer_from(config.tokenizer,
                                        "pass a local folder: tokenizer: ../shared/models/tiny-gpt2 has GPT-2's")
        self.train_tokens, self.val_tokens = load_token_splits(config.data, self.tokenizer, config.val_fraction,
                                                               config.block_size)
        self.batches_per_epoch = max(1, len(self.train_tokens) // (config.batch_size * config.block_size))
        self.total_steps = config.epochs * self.batches_per_epoch
        self.schedule = PruneSchedule(config.target_sparsity, self.total_steps, config.warmup_ratio,
                                      config.final_prune_ratio, config.prune_applications, config.ramp)
        self.schedule.validate()
        self.plan = self.schedule.plan() if config.target_sparsity > 0 else {}
        check_output_dir(config.output_dir)
        torch.manual_seed(config.seed)
        model_config = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                  n_positions=config.block_size, vocab_size=len(self.tokenizer),
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=self.tokenizer.eos_token_id, eos_token_id=self.tokenizer.eos_token_id)
        self.model = GPT2LMHeadModel(model_config).to(self.device)
        self.weights = prunable_weights(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.run_dir = Path(config.output_dir)
        self.run = RunDir(self.run_dir, TRL_PREFIX)
        self.masks: dict[str, torch.Tensor] = {}
        self.state = {"step": 0, "level": 0.0, "elapsed": 0.0, "revival_history": [], "sparsity_history": []}
        if config.resume:
            self._load_latest()
        elif (self.run_dir / "metrics.jsonl").exists():
            raise SubnetscopeError(f"{self.run_dir} holds a run already: pass --resume, or pick a new output_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json",
                   {**asdict(config), "total_steps": self.total_steps, "batches_per_epoch": self.batches_per_epoch,
                    "prune_plan": {str(k): v for k, v in self.plan.items()}, "phases": self.phases(),
                    "parameters": self.model.num_parameters()})
        self.logger = MetricsLogger(self.run_dir, config.wandb, asdict(config), resume_step=self.state["step"])

    def _held_after(self) -> int | None:
        """The pruning step after which the zeros are held: the first with hard_mask, the last (the
        finalization phase follows) with hold_final; None when they never are."""
        if not self.plan:
            return None
        if self.config.hard_mask:
            return min(self.plan)
        return max(self.plan) if self.config.hold_final else None

    def mask_held(self, step: int) -> bool:
        """Whether the pruned weights are put back to zero after this step's update."""
        start = self._held_after()
        return start is not None and step > start

    def phases(self) -> dict[str, list[int] | None]:
        """First and last step of each phase (None: the phase is empty), and the step the mask is held from."""
        if not self.plan:
            return {"warmup": [1, self.total_steps], "pruning": None, "finalization": None, "mask_held_from": None}
        first, last, held = min(self.plan), max(self.plan), self._held_after()
        return {"warmup": [1, first - 1] if first > 1 else None, "pruning": [first, last],
                "finalization": [last + 1, self.total_steps] if last < self.total_steps else None,
                "mask_held_from": held + 1 if held is not None and held < self.total_steps else None}

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.model, inputs, targets, self.device)

    def evaluate(self) -> float:
        cfg = self.config
        return heldout_loss(self.model, self.val_tokens, cfg.batch_size, cfg.block_size, cfg.eval_batches, self.device,
                            seed=VAL_SEED)

    def _log(self, step: int, train_loss: float, grad_norms: tuple[float, dict[str, float]],
             interval_rate: float | None, last: bool) -> None:
        """revival_rate: of the weights zeroed at the last application, the fraction non-zero now;
        interval_rate (at an application): that fraction just before re-pruning, over the whole interval."""
        cfg = self.config
        total_norm, tensor_norms = grad_norms
        metrics: dict = {"train/loss": train_loss, "pruning/sparsity": self.state["level"],
                         "pruning/mask_held": self.mask_held(step), "pruning/grad_norm_zeroed": total_norm,
                         "time/elapsed": self.state["elapsed"]}
        metrics.update({f"zero_grad_norm/{name}": norm for name, norm in tensor_norms.items()})
        metrics.update(structure_metrics(self.weights, with_rank=cfg.rank_metrics))
        metrics["weight_revival/revival_rate"] = revival_rate(self.weights, self.masks)
        if interval_rate is not None:
            metrics["weight_revival/interval_rate"] = interval_rate
        history = self.state["revival_history"]
        metrics["trends/avg_revival_rate"] = sum(history) / len(history) if history else None
        self.state["sparsity_history"] = (self.state["sparsity_history"]
                                          + [[step, metrics["sparsity/overall"]]])[-SLOPE_WINDOW:]
        hist = self.state["sparsity_history"]
        metrics["trends/sparsity_slope"] = slope([s for s, _ in hist], [v for _, v in hist])
        if step % cfg.eval_every == 0 or last:
            metrics["val/loss"] = self.evaluate()
        self.logger.log(step, metrics)

    def train(self) -> dict:
        cfg = self.config
        self.model.train()
        bar = tqdm(range(self.state["step"] + 1, self.total_steps + 1), initial=self.state["step"],
                   total=self.total_steps, desc="prune", disable=cfg.no_tqdm)
        train_losses: list[torch.Tensor] = []
        for step in bar:
            t0 = time.perf_counter()
            inputs, targets = sample_windows(self.train_tokens, cfg.batch_size, cfg.block_size,
                                             seed=stream_seed(cfg.seed, step, STEP_STRIDE))
            loss = self._loss(inputs, targets)
            loss.backward()
            logging_now = step % cfg.log_every == 0 or step == self.total_steps or step in self.plan
            grad_norms = zeroed_grad_norms(self.weights, self.masks) if logging_now else (0.0, {})
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.mask_held(step):
                reapply_masks_(self.weights, self.masks)
            train_losses.append(loss.detach())  # kept on the device: one host sync per record, not per step
            interval_rate = None
            if step in self.plan:
                interval_rate = revival_rate(self.weights, self.masks)
                if interval_rate is not None:
                    self.state["revival_history"].append(interval_rate)
                self.state["level"] = self.plan[step]
                self.masks = magnitude_prune_(self.weights, self.plan[step])
            self.state["step"] = step
            train_loss = float(torch.stack(train_losses).mean()) if logging_now else None
            self.state["elapsed"] += time.perf_counter() - t0
            if logging_now:
                self._log(step, train_loss, grad_norms, interval_rate, last=step == self.total_steps)
                bar.set_postfix(loss=f"{train_loss:.3f}", level=f"{self.state['level']:.2f}")
                train_losses = []
            if step % cfg.save_every == 0 or step == self.total_steps:
                self._save(step)
        self._save_final()
        self.logger.close()
        return {"steps": self.total_steps, "val_loss": self.evaluate(),
                "sparsity/overall": structure_metrics(self.weights, with_rank=False)["sparsity/overall"]}

    def _save(self, step: int) -> None:
        def write(tmp: Path) -> None:
            save_file({n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            save_file({n: m.cpu() for n, m in self.masks.items()}, str(tmp / MASKS_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "state": json.dumps(self.state)}, tmp / TRAINER_STATE)

        self.run.save_step(step, write)

    def _save_final(self) -> None:
        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        self.run.finalize(write)

    def _load_latest(self) -> None:
        """Weights, optimizer, masks and counters from the newest complete checkpoint-N, if any."""
        if not self.run_dir.is_dir():
            raise SubnetscopeError(f"--resume: {self.run_dir} does not exist: drop --resume to start a run")
        folder = self.run.latest(required=(TRAINER_STATE,), one_of=()).folder
        if folder is None:
            return
        source = open_checkpoint(str(folder))
        params = dict(self.model.named_parameters())
        if set(source.names()) != set(params):
            raise SubnetscopeError(f"--resume: {folder} does not match this model config: pick a new output_dir")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(source.get(name))
        saved = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = json.loads(saved["state"])
        self.masks = {n: m.to(self.device) for n, m in load_file(str(folder / MASKS_FILE)).items()}
