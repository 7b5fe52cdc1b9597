"""The update tracker as a `transformers.TrainerCallback`, for any Trainer-based TRL trainer.

    trainer = GRPOTrainer(..., callbacks=[SubnetTrackerCallback()])   # or SFT, DPO, RLOO

At the start it saves θ0 to `<output_dir>/base` (so the analysis CLIs can read the trainer's own
`checkpoint-N` folders against it), snapshots θ0, and after every optimizer step records the
changed counts and appends the tracker's metrics to `<output_dir>/subnet_metrics.jsonl`; they
are also added to the trainer's logs, so W&B and the console show them. Each checkpoint gets the
tracker's state, so `trainer.train(resume_from_checkpoint=True)` continues it against the saved θ0.

With a `view_dtype` other than the weights' own (fp32 weights trained with `bf16=True`, judged as
the bf16 model a recipe publishes), base/ holds θ0 at the view, each checkpoint-N gets a compact
`subnet.safetensors` of its weights at the view (which the analysis reads in preference to the
trainer's fp32 `model.safetensors`, kept for resume), and `changed_master/<rule>` counts the fp32
weights themselves against their θ0, kept in `subnet_master_base.safetensors`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .changes import RULES, ChangeRules
from .checkpoint import (
    BASE_DIR,
    COMPACT_FILE,
    atomic_write_file,
    open_checkpoint,
    save_compact,
)
from .errors import SubnetscopeError
from .logger import MetricsLogger
from .rl import MASTER_PREFIX
from .runstate import HEADER_BYTES, fsync_path, save_model, write_dir_checked
from .tracker import StepCounts, UpdateTracker

TRACKER_FILE = "subnet_tracker.safetensors"
MASTER_BASE_FILE = "subnet_master_base.safetensors"  # θ0 of the fp32 weights, when base/ holds a rounding
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def _strip_wrapper(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _durable_file(path: Path, write: Callable[[Path], None]) -> None:
    """A file written through a temporary name, on disk before the rename."""
    def write_synced(tmp: Path) -> None:
        write(tmp)
        fsync_path(tmp)

    atomic_write_file(path, write_synced)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _durable_file(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                              str(tmp)))


def _differs(base_dir: Path, params: dict[str, torch.Tensor]) -> str | None:
    """Why the θ0 in `base_dir` cannot be these parameters' (names or shapes), or None when it can."""
    base = open_checkpoint(str(base_dir))
    names = set(base.names())
    for name, p in params.items():
        if name not in names:
            return f"it lacks {name}"
        if tuple(base.shape(name)) != tuple(p.shape):
            return f"its {name} is {tuple(base.shape(name))}, the model's {tuple(p.shape)}"
    return None


class SubnetTrackerCallback(TrainerCallback):
    def __init__(self, rules: ChangeRules = ChangeRules(), topk: int = 3, save_base: bool = True,
                 view_dtype: torch.dtype | None = None):
        """`view_dtype`: judge the weights (θ0 and θ_t alike) rounded to this dtype, as they would be
        published; None judges them in their own dtype. A TRL run with `bf16=True` on fp32 weights
        trains fp32 masters under bf16 autocast: pass torch.bfloat16 to judge them at the precision a
        recipe publishes (fp32 counts then come as `changed_master/<rule>`). `save_base=False` leaves
        base/ to the caller; resuming needs it either way."""
        self.rules = rules
        self.topk = topk
        self.save_base = save_base
        self.view_dtype = view_dtype
        self.tracker: UpdateTracker | None = None
        self.master: UpdateTracker | None = None  # the trained weights themselves, when the view rounds them
        self.logger: MetricsLogger | None = None
        self._pending: dict[str, float] = {}

    @property
    def history(self) -> list[StepCounts]:
        return self.tracker.history if self.tracker else []

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        params = {_strip_wrapper(n): p for n, p in model.named_parameters() if p.requires_grad}
        out = Path(args.output_dir)
        rounds = self.view_dtype is not None and any(p.dtype != self.view_dtype for p in params.values())
        view = self.view_dtype if rounds else None
        initial = master_initial = None
        if state.global_step > 0:  # θ0 is the saved base, not the weights the trainer just restored
            initial, master_initial = self._saved_theta0(out, params, rounds, state.global_step)
        else:
            self._check_stale_base(out, params)
            if state.is_world_process_zero:
                self._write_base(out, model, processing_class, params, rounds)
        steps = max(state.max_steps, 1)
        self.tracker = UpdateTracker(params, self.rules, initial=initial, max_steps=steps, topk=self.topk,
                                     view_dtype=view)
        self.master = (UpdateTracker(params, self.rules, initial=master_initial, max_steps=steps, topk=self.topk)
                       if rounds else None)
        saved = out / f"checkpoint-{state.global_step}" / TRACKER_FILE
        if state.global_step > 0 and saved.is_file():
            self._load_state(load_file(str(saved)), params)
        self.logger = MetricsLogger(out, None, {}, resume_step=state.global_step,
                                    enabled=state.is_world_process_zero, filename="subnet_metrics.jsonl")

    def _judged_dtype(self, params: dict[str, torch.Tensor]) -> torch.dtype:
        return self.view_dtype or next(iter(params.values())).dtype

    def _saved_theta0(self, out: Path, params: dict[str, torch.Tensor], rounds: bool,
                      step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """θ0 of a resumed run (at the view) from base/, and of the fp32 weights when the view rounds them."""
        base_dir = out / BASE_DIR
        if not base_dir.is_dir():
            raise SubnetscopeError(f"resuming at step {step}, but {base_dir} (θ0, written when the run started) is "
                                   "missing: restore it, or start the run afresh")
        problem = _differs(base_dir, params)
        if problem:
            raise SubnetscopeError(f"{base_dir} holds another model's θ0 ({problem}): resume with the model the run "
                                   "started from, or start afresh in a new output_dir")
        base = open_checkpoint(str(base_dir))
        judged = self._judged_dtype(params)
        stored = base.dtype(next(iter(params)))
        if stored != judged:
            raise SubnetscopeError(f"{base_dir} holds θ0 in {str(stored).removeprefix('torch.')} but this run judges "
                                   f"in {str(judged).removeprefix('torch.')}: resume with the view_dtype the run "
                                   "started with")
        initial = {n: base.get(n).to(p.device, judged) for n, p in params.items()}
        if not rounds:
            return initial, None
        masters = out / MASTER_BASE_FILE
        if not masters.is_file():
            raise SubnetscopeError(f"{masters} (θ0 of the fp32 weights) is missing: the run did not start judging at "
                                   "a rounding; resume with the view_dtype it started with")
        master = load_file(str(masters))
        return initial, {n: master[n].to(p.device, p.dtype) for n, p in params.items()}

    @staticmethod
    def _check_stale_base(out: Path, params: dict[str, torch.Tensor]) -> None:
        """A fresh start rewrites base/ from its own weights; beside the trainer's checkpoints of another
        model it refuses, rather than mix two runs in one folder."""
        base_dir = out / BASE_DIR
        if not base_dir.is_dir():
            return
        checkpoints = sorted(c.name for c in out.iterdir() if c.is_dir() and _CHECKPOINT.match(c.name))
        problem = _differs(base_dir, params) if checkpoints else None
        if problem:
            raise SubnetscopeError(f"{out} holds {', '.join(checkpoints)} of another model ({base_dir}: {problem}): "
                                   "pass a new output_dir, or delete that run first")

    def _write_base(self, out: Path, model, processing_class, params: dict[str, torch.Tensor], rounds: bool) -> None:
        """θ0 at the view dtype as base/ (what would be published), and the fp32 θ0 beside it when the view
        rounds; both replace what a killed start left."""
        out.mkdir(parents=True, exist_ok=True)
        if rounds:
            _write_tensors(out / MASTER_BASE_FILE, params)
        else:
            (out / MASTER_BASE_FILE).unlink(missing_ok=True)
        if not self.save_base:
            return

        def write(tmp: Path) -> None:
            save_model(model, tmp, self.view_dtype)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)

        view_size = torch.empty((), dtype=self._judged_dtype(params)).element_size()
        need = sum(p.numel() for p in params.values()) * view_size + HEADER_BYTES
        write_dir_checked(out / BASE_DIR, write, need)

    def _load_state(self, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        on_device = {k: v.to(params[k.split("::")[-1]].device) for k, v in state.items()}
        self.tracker.load_state_dict({k: v for k, v in on_device.items() if not k.startswith(MASTER_PREFIX)})
        if self.master is not None:
            master = {k.removeprefix(MASTER_PREFIX): v for k, v in on_device.items() if k.startswith(MASTER_PREFIX)}
            if not master:
                raise SubnetscopeError("the checkpoint's tracker state has no fp32 master counts (the run did not "
                                       "judge at a rounding): resume with the view_dtype it started with")
            self.master.load_state_dict(master)

    def _state(self) -> dict[str, torch.Tensor]:
        state = self.tracker.state_dict()
        if self.master is not None:
            state.update({f"{MASTER_PREFIX}{k}": v for k, v in self.master.state_dict().items()})
        return state

    def on_save(self, args, state, control, **kwargs):
        """Keep the tracker's state beside the trainer's checkpoint, for resume_from_checkpoint (written
        last: it marks the checkpoint complete); with a rounding view, the published weights first."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (state.is_world_process_zero and folder.is_dir()):
            return
        if self.master is not None:
            masks = self.tracker.exact_masks()
            tensors = {n: (self.tracker.published(n), masks[n]) for n in self.tracker.params}
            _durable_file(folder / COMPACT_FILE, lambda tmp: save_compact(tmp, state.global_step, f"../{BASE_DIR}",
                                                                           tensors))
        _write_tensors(folder / TRACKER_FILE, self._state())

    def on_optimizer_step(self, args, state, control, **kwargs):
        record = self.tracker.update(state.global_step + 1)
        self._pending = self.tracker.metrics(record)
        if self.master is not None:
            master = self.master.update(record.step)
            total = sum(master.numel)
            self._pending.update({f"changed_master/{r}": master.total("vs_initial", r) / total for r in RULES})
        self.logger.log(record.step, self._pending)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update({f"subnet/{k}": v for k, v in self._pending.items()
                         if k.startswith(("changed/", "changed_master/", "sparsity/"))})
