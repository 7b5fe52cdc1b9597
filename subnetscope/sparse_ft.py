"""Sparse fine-tuning of a causal LM on a text task: a pruned model trained within its mask, or
sparse LoRA on PEFT.

Methods: `masked` trains the model's own weights with W ← W⊙M, gradients masked and pruned entries
put back to zero after every step (no mask: dense fine-tuning); `lora` trains PEFT LoRA adapters
over the masked weights (see sparse_lora.py for the two modes). Precision as every trainer here
(subnetscope.precision): `--precision` mixed, bf16 or fp32 and `--view_dtype`, the dtype final/ is
published in. The run folder holds config.json, metrics.jsonl (train/val loss, samples/s, elapsed
seconds), checkpoint-N/ (trainable weights, optimizer, step, elapsed time; written atomically,
`--resume` continues from the newest), final/ (the merged model) and summary.json: validation loss,
sparsity, the task metric of the final model (task_metrics.py: accuracy for BoolQ and HellaSwag,
exact match for GSM8K), wall time and peak memory. Runs are aggregated by prune_report.py and
run_sparse_sweep.py.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import open_checkpoint
from .config import SparseFTConfig
from .confine import ConfinedUpdates
from .data import EVAL_SPLITS, TASK_COLUMNS, load_task_split, task_texts, token_stream
from .devices import resolve_device
from .errors import SubnetscopeError
from .importance import prunable_tensors
from .lm import sample_windows
from .logger import MetricsLogger
from .masks import check_masks_fit, load_masks
from .models import load_causal_lm, load_tokenizer
from .outputs import check_output_dir
from .precision import resolve_precision
from .report import write_json
from .rundir import TRL_PREFIX, RunDir, save_model
from .runstate import rng_state, set_rng_state
from .seeds import STEP_STRIDE, stream_seed
from .sparse_lora import add_sparse_lora, merge_sparse_lora
from .task_metrics import task_score

TRAINER_STATE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
VAL_SEED = 20_000_003  # the validation windows: the same every evaluation and every run


def split_tokens(train_texts: list[str], val_texts: list[str], tokenizer,
                 seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams of the training and the held-out texts."""
    train, val = token_stream(train_texts, tokenizer), token_stream(val_texts, tokenizer)
    if min(len(train), len(val)) <= seq_len + 1:
        raise SubnetscopeError(f"the task has too few tokens for --seq_len {seq_len} (train {len(train)}, "
                               f"validation {len(val)}): use more --max_texts or a shorter --seq_len")
    return train, val


def peak_memory(device: str) -> dict[str, float | None]:
    """This process's peak memory so far: GPU memory allocated by torch (None on a CPU), and resident set."""
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.startswith("cuda") else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    return {"peak_gpu_memory_gb": gpu, "peak_cpu_rss_gb": rss}


class SparseFTTrainer:
    def __init__(self, config: SparseFTConfig):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device, config.view_dtype)
        self.run_dir = check_output_dir(config.output_dir)
        self.run = RunDir(self.run_dir, TRL_PREFIX)
        if not config.resume and (self.run_dir / "metrics.jsonl").exists():
            raise SubnetscopeError(f"{self.run_dir} holds a run already: pass --resume, or pick a new --output_dir")
        self.tokenizer = load_tokenizer(config.policy, config.tokenizer)
        self.task_kind, records = load_task_split(config.task, "train", config.max_texts, config.seed)
        n_val = max(1, int(len(records) * config.val_fraction))
        train, held_out = records.select(range(len(records) - n_val)), records.select(range(len(records) - n_val,
                                                                                             len(records)))
        self.train_tokens, self.val_tokens = split_tokens(task_texts(self.task_kind, train, config.task),
                                                          task_texts(self.task_kind, held_out, config.task),
                                                          self.tokenizer, config.seq_len)
        self.eval_records = self._eval_records(held_out)
        base = load_causal_lm(config.policy, self.precision.weights, vocab_size=len(self.tokenizer))
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
        self.elapsed = 0.0  # training seconds of earlier sessions of a resumed run
        self.peaks: dict[str, float | None] = {}
        if config.resume:
            self._load_latest()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", self.describe())
        self.logger = MetricsLogger(self.run_dir, config.wandb, asdict(config), resume_step=self.step)

    def _eval_records(self, held_out):
        """The records the final model is scored on: --eval_data, else a named task's evaluation split
        (test for GSM8K), else the held-out records of a local file; None for plain text (no task metric)."""
        cfg, kind = self.config, self.task_kind
        if kind is None:
            if cfg.eval_data:
                raise SubnetscopeError(f"--eval_data: --task {cfg.task} is plain text, which has no task metric: "
                                       f"give --task records with the columns of {', '.join(TASK_COLUMNS)}")
            return None
        if cfg.eval_data:
            found, records = load_task_split(cfg.eval_data, "train", cfg.eval_examples, cfg.seed)
            if found != kind:
                raise SubnetscopeError(f"--eval_data {cfg.eval_data} holds {found or 'plain text'} records, not {kind} "
                                       f"ones: give it {kind}'s columns {', '.join(TASK_COLUMNS[kind])}")
            return records
        if cfg.task in EVAL_SPLITS and not Path(cfg.task).expanduser().exists():
            return load_task_split(cfg.task, EVAL_SPLITS[cfg.task], cfg.eval_examples, cfg.seed)[1]
        return held_out.select(range(min(cfg.eval_examples, len(held_out))))

    def describe(self) -> dict:
        """Settings plus what prune_report.py groups by: model, task, method and sparsity."""
        settings = self.mask_set.settings if self.mask_set else {}
        mask_method = "dense" if not self.mask_set else "/".join(
            str(settings[k]) for k in ("method", "importance", "group") if settings.get(k))
        method = self.config.method if self.config.method == "masked" else f"lora-{self.config.lora_mode}"
        return {**asdict(self.config), **{f"{k}_used": v for k, v in self.precision.record().items()},
                "kind": "sparse_ft", "model_name": Path(self.config.policy).name,
                "task_name": Path(self.config.task).name.split(".")[0], "task_format": self.task_kind,
                "finetune": method, "mask_method": mask_method, "sparsity": self._target_sparsity(),
                "trainable_parameters": sum(p.numel() for p in self.trainable.values())}

    def _target_sparsity(self) -> float:
        """The sparsity the mask was made for, else the mask's own (rounded: it is a group key)."""
        if self.mask_set is None:
            return 0.0
        return float(self.mask_set.settings.get("sparsity", round(self.mask_set.sparsity(), 6)))

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in float32, the forward under --precision's autocast."""
        with self.precision.autocast(self.device):
            logits = self.model(input_ids=inputs.to(self.device), use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.to(self.device).flatten())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over --eval_batches fixed windows of the held-out texts."""
        cfg = self.config
        self.model.eval()
        losses = [float(self._loss(*sample_windows(self.val_tokens, cfg.batch_size, cfg.seq_len, seed=VAL_SEED + i)))
                  for i in range(cfg.eval_batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _wall(self, session_start: float) -> float:
        self._sync()
        return self.elapsed + time.perf_counter() - session_start

    def _peaks(self) -> dict[str, float | None]:
        """Peak memory over every session of the run (a resumed run keeps its earlier sessions' peaks)."""
        now = peak_memory(self.device)
        return {k: v if self.peaks.get(k) is None else max(v or 0.0, self.peaks[k]) for k, v in now.items()}

    def train(self) -> dict:
        cfg = self.config
        self.model.train()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        session_start = time.perf_counter()
        bar = tqdm(range(self.step + 1, cfg.max_steps + 1), initial=self.step, total=cfg.max_steps,
                   desc=f"sparse-ft {cfg.method}", disable=cfg.no_tqdm)
        losses: list[torch.Tensor] = []
        t_start, n_samples = time.perf_counter(), 0
        for step in bar:
            inputs, targets = sample_windows(self.train_tokens, cfg.batch_size, cfg.seq_len,
                                             seed=stream_seed(cfg.seed, step, STEP_STRIDE))
            loss = self._loss(inputs, targets)
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
                metrics = {"train/loss": float(torch.stack(losses).mean()),
                           "throughput/samples_per_s": n_samples / elapsed}
                if step % cfg.eval_every == 0 or last:
                    metrics["val/loss"] = self.evaluate()
                metrics["time/elapsed"] = self._wall(session_start)
                if self.device.startswith("cuda"):
                    metrics["memory/peak_gpu_gb"] = self._peaks()["peak_gpu_memory_gb"]
                self.logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                losses, t_start, n_samples = [], time.perf_counter(), 0
            if step % cfg.save_every == 0 or last:
                self._save(step, self._wall(session_start))
        result = self._save_final(session_start)
        self.logger.close()
        return result

    def _save(self, step: int, elapsed: float) -> None:
        def write(tmp: Path) -> None:
            save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable.items()}, str(tmp / TRAINABLE_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "step": step, "rng": rng_state(), "elapsed": elapsed,
                        "peaks": self._peaks()}, tmp / TRAINER_STATE)

        self.run.save_step(step, write)

    def _load_latest(self) -> None:
        folder = self.run.latest(required=(TRAINER_STATE,), one_of=()).folder
        if folder is None:
            return
        source = open_checkpoint(str(folder / TRAINABLE_FILE))
        if set(source.names()) != set(self.trainable):
            raise SubnetscopeError(f"--resume: {folder} was written by other settings (method, mask or LoRA rank): "
                                   "resume with the same settings, or pick a new --output_dir")
        saved = self.run_dir / "config.json"
        used = json.loads(saved.read_text()).get("precision_used") if saved.is_file() else None
        if used is not None and used != self.precision.name:
            raise SubnetscopeError(f"--resume: {self.run_dir} was trained at --precision {used}, this run resolves "
                                   f"--precision {self.config.precision} to {self.precision.name}: "
                                   f"pass --precision {used}")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(source.get(name))
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))  # runs saved before elapsed time was kept start at 0
        self.peaks = dict(state.get("peaks", {}))
        set_rng_state(state["rng"])  # dropout continues as if never interrupted

    def _save_final(self, session_start: float) -> dict:
        """Merge (LoRA) and mask, write final/ at the view dtype, score the task, and report the sparsity
        of the masked weights, the wall time of training and the peak memory."""
        val_loss = self.evaluate()
        model = merge_sparse_lora(self.model, self.masks) if self.config.method == "lora" else self.model
        params = dict(model.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in self.masks)
        total = sum(params[n].numel() for n in self.masks)

        def write(tmp: Path) -> None:
            save_model(model, tmp, self.precision.view)
            self.tokenizer.save_pretrained(tmp)

        self.run.finalize(write)
        with torch.no_grad():  # scored as published: the weights rounded to the view, as in final/
            for p in model.parameters():
                p.copy_(p.to(self.precision.view))
        summary = {"val_loss": val_loss, "steps": self.step, "final_sparsity": zeros / total if total else 0.0,
                   "wall_seconds": self._wall(session_start), **self._peaks()}
        summary.update(self._task_metric(model))
        if summary["task_metric"]:
            self.logger.log(self.step, {f"eval/{summary['task_metric']}": summary["task_score"]})
        write_json(self.run_dir / "summary.json", summary)
        return summary

    def _task_metric(self, model: torch.nn.Module) -> dict:
        """The task metric of the published model (final/'s weights) and the seconds it took; None for
        plain text."""
        if self.eval_records is None:
            return {"task_metric": None, "task_score": None}
        started = time.perf_counter()
        result = task_score(model, self.tokenizer, self.task_kind, self.eval_records, self.config.batch_size,
                            self.config.eval_max_new_tokens, lambda: self.precision.autocast(self.device))
        return {**result, "task_eval_seconds": time.perf_counter() - started}
