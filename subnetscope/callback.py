"""The update tracker as a `transformers.TrainerCallback`, for any Trainer-based TRL trainer.

    trainer = GRPOTrainer(..., callbacks=[SubnetTrackerCallback()])   # or SFT, DPO, RLOO; peft_config too

At the start it saves θ0 to `<output_dir>/base` (so the analysis CLIs can read the trainer's own
`checkpoint-N` folders against it), snapshots θ0, and after every optimizer step records the
changed counts and appends the tracker's metrics to `<output_dir>/subnet_metrics.jsonl`. It puts
itself first among the trainer's callbacks, so `subnet/*` reaches `trainer.state.log_history` and
every `report_to` integration (W&B, TensorBoard, ...), which transformers calls in list order with
the user's callbacks last. Each checkpoint gets the tracker's state, so
`trainer.train(resume_from_checkpoint=True)` continues it against the saved θ0.

θ0 is fingerprinted (names, shapes, and the bits of sampled entries, checkpoint.tensor_digest): a
base/ of another model beside this run's checkpoints, or not the one a checkpoint was tracked
against, is refused in one line instead of being reused.

With a `view_dtype` other than the weights' own (fp32 weights trained with `bf16=True`, judged as
the bf16 model a recipe publishes), base/ holds θ0 at the view, each checkpoint-N gets a compact
`subnet.safetensors` of its weights at the view (which the analysis reads in preference to the
trainer's fp32 `model.safetensors`, kept for resume), and `changed_master/<rule>` counts the fp32
weights themselves against their θ0, kept in `subnet_master_base.safetensors`.

A LoRA run (`peft_config`, a PEFT model) is tracked as the merged model W0 + scale·B·A under the
base model's names (lora_tracker.py); base/ holds the base model, and the analysis merges the
adapter checkpoints onto it (lora_merge.py).

Memory: the tracker keeps θ0, the previous step's weights, a scratch copy and the step each weight
first changed, about 3.5x the tracked weights' bytes (printed at the start, `memory/tracker_bytes`
in subnet_metrics.jsonl). `offload=True` keeps all of it in CPU memory (pinned under CUDA: no GPU
memory, one device-to-host copy and a CPU comparison per step); `reference=trainer.ref_model` makes
the frozen reference model's parameters views of the tracker's θ0 (one copy instead of two).
"""
from __future__ import annotations

import inspect
import json
import re
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .changes import RULES, ChangeRules
from .checkpoint import (
    BASE_DIR,
    COMPACT_FILE,
    TRL_TRACKER_STATE,
    atomic_write_file,
    fingerprint,
    fingerprint_mismatch,
    open_checkpoint,
    save_compact,
    source_fingerprint,
)
from .errors import SubnetscopeError
from .launch import warn_launch_mismatch
from .logger import MetricsLogger
from .lora_tracker import LoraTracker, base_parameters, base_state, is_lora_model
from .rl import MASTER_PREFIX
from .runstate import HEADER_BYTES, fsync_path, save_model, tensor_bytes, write_dir_checked
from .tracker import StepCounts, UpdateTracker

TRACKER_FILE = TRL_TRACKER_STATE
MASTER_BASE_FILE = "subnet_master_base.safetensors"  # θ0 of the fp32 weights, when base/ holds a rounding
FINGERPRINT_KEY = "theta0_fingerprint"  # tracker files' metadata: θ0 they were tracked against
LOGGED = ("changed/", "changed_master/", "sparsity/", "time/")  # what goes to the trainer's logs as subnet/*
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
SHARDED = {"DTensor", "FlatParameter"}


def _strip_wrapper(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _durable_file(path: Path, write: Callable[[Path], None]) -> None:
    """A file written through a temporary name, on disk before the rename."""
    def write_synced(tmp: Path) -> None:
        write(tmp)
        fsync_path(tmp)

    atomic_write_file(path, write_synced)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    _durable_file(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                              str(tmp), metadata=metadata))


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


def _base_mismatch(base_dir: Path, params: dict[str, torch.Tensor], expected: dict[str, str]) -> str | None:
    """Why base/ is not the θ0 fingerprinted as `expected`: names, shapes, or values; None when it is."""
    return _differs(base_dir, params) or fingerprint_mismatch(
        expected, source_fingerprint(open_checkpoint(str(base_dir)), list(params)))


def _refuse_sharded(params: dict[str, torch.Tensor]) -> None:
    """FSDP and DeepSpeed ZeRO-3 hand each process a shard: counts of shards are not the model's."""
    for name, p in params.items():
        if type(p).__name__ in SHARDED or hasattr(p, "ds_id") or getattr(p, "_is_flat_param", False):
            raise SubnetscopeError(f"the model's parameters are sharded ({name}: FSDP or DeepSpeed ZeRO-3): "
                                   "SubnetTrackerCallback needs whole parameters on each process; train under DDP "
                                   "(or one process), or compare saved full checkpoints with "
                                   "analyze_sparse_subnetwork.py")


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _tensors_in(obj, seen: set[int]):
    """Every tensor an object of this package holds, through lists, tuples, dicts and its own objects."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, seen)
    elif type(obj).__module__.startswith("subnetscope.") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _tensors_in(item, seen)


class SubnetTrackerCallback(TrainerCallback):
    def __init__(self, rules: ChangeRules = ChangeRules(), topk: int = 3, save_base: bool = True,
                 view_dtype: torch.dtype | None = None, offload: bool = False,
                 reference: torch.nn.Module | None = None):
        """`view_dtype`: judge the weights (θ0 and θ_t alike) rounded to this dtype, as they would be
        published; None judges them in their own dtype. A TRL run with `bf16=True` on fp32 weights
        trains fp32 masters under bf16 autocast: pass torch.bfloat16 to judge them at the precision a
        recipe publishes (fp32 counts then come as `changed_master/<rule>`). `save_base=False` leaves
        base/ to the caller; resuming needs it either way. `offload`: the tracker's buffers in CPU
        memory (pinned under CUDA), none on the GPU. `reference`: a frozen copy of θ0 (TRL's
        `trainer.ref_model`) whose parameters become views of the tracker's θ0."""
        self.rules = rules
        self.topk = topk
        self.save_base = save_base
        self.view_dtype = view_dtype
        self.offload = offload
        self.reference = reference
        self.tracker: UpdateTracker | None = None
        self.master: UpdateTracker | None = None  # the trained weights themselves, when the view rounds them
        self.logger: MetricsLogger | None = None
        self.overhead: dict[str, int] = {}  # bytes of the tracker's buffers per device
        self._pending: dict[str, float] = {}
        self._pending_step = self._logged_step = -1
        self._theta0: dict[str, str] = {}  # θ0's fingerprint, as judged
        self._sources: dict[str, torch.Tensor] = {}  # with offload: the trained parameters the mirror copies
        self._mirror: dict[str, torch.Tensor] = {}

    @property
    def history(self) -> list[StepCounts]:
        return self.tracker.history if self.tracker else []

    def _go_first(self) -> None:
        """transformers calls callbacks in list order, the user's after the reporting integrations, and a
        callback's additions to `logs` reach only those after it: move to the front of the handler
        calling us (safe mid-iteration: the callbacks after us keep their positions)."""
        frame = inspect.currentframe()
        try:
            while frame is not None:
                handler = frame.f_locals.get("self")
                if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                    handler.callbacks.remove(self)
                    handler.callbacks.insert(0, self)
                    return
                frame = frame.f_back
        finally:
            del frame

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._go_first()
        if state.is_world_process_zero:
            warn_launch_mismatch(getattr(args, "world_size", 1))
        out = Path(args.output_dir)
        if is_lora_model(model):
            params = base_parameters(model)
            _refuse_sharded(params)
            self._start_lora(out, model, processing_class, params, state)
        else:
            params = {_strip_wrapper(n): p for n, p in model.named_parameters() if p.requires_grad}
            _refuse_sharded(params)
            self._start_full(out, model, processing_class, params, state)
        saved = out / f"checkpoint-{state.global_step}" / TRACKER_FILE
        if state.global_step > 0 and saved.is_file():
            self._load_state(saved)
        self.logger = MetricsLogger(out, None, {}, resume_step=state.global_step,
                                    enabled=state.is_world_process_zero, filename="subnet_metrics.jsonl")
        self._report_overhead(params, [model, self.reference], state.is_world_process_zero)

    def _start_full(self, out: Path, model, processing_class, params: dict[str, torch.Tensor], state) -> None:
        rounds = self.view_dtype is not None and any(p.dtype != self.view_dtype for p in params.values())
        view = self.view_dtype if rounds else None
        tracked = self._make_mirror(params) if self.offload else params
        initial = master_initial = None
        if state.global_step > 0:  # θ0 is the saved base, not the weights the trainer just restored
            initial, master_initial = self._saved_theta0(out, tracked, rounds, state.global_step)
        else:
            self._theta0 = fingerprint(params, self._judged_dtype(params))
            self._check_stale_base(out, params)
            if state.is_world_process_zero:
                self._write_base(out, model, processing_class, params, rounds)
        if self.reference is not None:
            initial = self._reference_theta0(params)
        steps = max(state.max_steps, 1)
        self.tracker = UpdateTracker(tracked, self.rules, initial=initial, max_steps=steps, topk=self.topk,
                                     view_dtype=view)
        self.master = (UpdateTracker(tracked, self.rules, initial=master_initial, max_steps=steps, topk=self.topk)
                       if rounds else None)

    def _start_lora(self, out: Path, model, processing_class, params: dict[str, torch.Tensor], state) -> None:
        """θ0 is the model's own frozen base weights, fingerprinted against base/ (the base model)."""
        self._theta0 = fingerprint(params)
        base_dir = out / BASE_DIR
        if state.global_step > 0:
            if not base_dir.is_dir():
                raise SubnetscopeError(f"resuming at step {state.global_step}, but {base_dir} (the base model, written "
                                       "when the run started) is missing: restore it, or start the run afresh")
            problem = _base_mismatch(base_dir, params, self._theta0)
            if problem:
                raise SubnetscopeError(f"{base_dir} is not the base model this LoRA run adapts ({problem}): resume "
                                       "with the model the run started from, or start afresh in a new output_dir")
        else:
            self._check_stale_base(out, params)
            if state.is_world_process_zero and self.save_base:
                self._write_lora_base(out, model, processing_class)
        self.tracker = LoraTracker(model, self.rules, max_steps=max(state.max_steps, 1), topk=self.topk,
                                   view_dtype=self.view_dtype, offload=self.offload)
        self.master = None

    def _make_mirror(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CPU copies of the trained parameters (pinned under CUDA), refreshed each step: the tracker's input."""
        pin = any(p.is_cuda for p in params.values())
        self._sources = params
        self._mirror = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for n, p in params.items()}
        self._refresh_mirror()
        return self._mirror

    def _refresh_mirror(self) -> None:
        for name, p in self._sources.items():
            self._mirror[name].copy_(p.detach(), non_blocking=True)
        if any(p.is_cuda for p in self._sources.values()):
            torch.cuda.synchronize()

    def _reference_theta0(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference model's parameters as θ0, checked to be θ0 (its fingerprint), in the judged dtype
        and on the tracker's device: the tracker rebinds them to views of its own θ0 buffer."""
        if self.offload:
            raise SubnetscopeError("offload=True keeps θ0 in CPU memory; a reference model on the GPU cannot share "
                                   "it: pass one of offload and reference")
        reference = {_strip_wrapper(n): p for n, p in self.reference.named_parameters()}
        judged = self._judged_dtype(params)
        for name, p in params.items():
            ref = reference.get(name)
            if ref is None or ref.shape != p.shape or ref.dtype != judged or ref.device != p.device:
                held = "lacks it" if ref is None else f"has it as {tuple(ref.shape)} {ref.dtype} on {ref.device}"
                raise SubnetscopeError(f"the reference model cannot share θ0: it {held} for {name}, the tracker needs "
                                       f"{tuple(p.shape)} {judged} on {p.device}; leave reference out")
        problem = fingerprint_mismatch(self._theta0, fingerprint({n: reference[n] for n in params}))
        if problem:
            raise SubnetscopeError(f"the reference model is not θ0 ({problem}): a synced or other reference cannot "
                                   "share θ0 (TRL's sync_ref_model); leave reference out")
        return {n: reference[n] for n in params}

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
        self._theta0 = source_fingerprint(base, list(params))
        initial = {n: base.get(n).to(p.device, judged) for n, p in params.items()}
        if not rounds:
            return initial, None
        masters = out / MASTER_BASE_FILE
        if not masters.is_file():
            raise SubnetscopeError(f"{masters} (θ0 of the fp32 weights) is missing: the run did not start judging at "
                                   "a rounding; resume with the view_dtype it started with")
        master = load_file(str(masters))
        return initial, {n: master[n].to(p.device, p.dtype) for n, p in params.items()}

    def _check_stale_base(self, out: Path, params: dict[str, torch.Tensor]) -> None:
        """A fresh start rewrites base/ from its own weights; beside the trainer's checkpoints of another
        model (names, shapes or values: the fingerprint) it refuses, rather than mix two runs in one folder.
        With save_base=False, base/ must already be this θ0."""
        base_dir = out / BASE_DIR
        if not base_dir.is_dir():
            return
        checkpoints = sorted(c.name for c in out.iterdir() if c.is_dir() and _CHECKPOINT.match(c.name))
        if not checkpoints and self.save_base:
            return  # a killed start's leftover: replaced below
        problem = _base_mismatch(base_dir, params, self._theta0)
        if problem and checkpoints:
            raise SubnetscopeError(f"{out} holds {', '.join(checkpoints)} of another model ({base_dir}: {problem}): "
                                   "pass a new output_dir, or delete that run first")
        if problem:
            raise SubnetscopeError(f"{base_dir} is not this model's θ0 ({problem}) and save_base=False keeps it: "
                                   "write the model's θ0 there, or pass a new output_dir")

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

    @staticmethod
    def _write_lora_base(out: Path, model, processing_class) -> None:
        """The base model (not the adapter) as base/, in its own dtype: what the adapter is merged onto."""
        out.mkdir(parents=True, exist_ok=True)
        (out / MASTER_BASE_FILE).unlink(missing_ok=True)
        state = base_state(model)

        def write(tmp: Path) -> None:
            model.get_base_model().save_pretrained(tmp, state_dict=state)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)

        write_dir_checked(out / BASE_DIR, write, tensor_bytes(state.values()) + HEADER_BYTES)

    def _report_overhead(self, params: dict[str, torch.Tensor], models: list, show: bool) -> None:
        """The bytes of the tracker's own buffers per device (storages of the models' parameters, a shared θ0
        included, are not counted), printed once against the tracked weights' bytes."""
        owned = {p.untyped_storage().data_ptr() for m in models if m is not None for p in m.parameters()}
        seen_ids: set[int] = set()
        storages: dict[int, tuple[str, int]] = {}
        for tensor in _tensors_in([self.tracker, self.master, self._mirror], seen_ids):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in owned and storage.nbytes():
                storages[storage.data_ptr()] = (str(tensor.device), storage.nbytes())
        self.overhead = {}
        for device, nbytes in storages.values():
            self.overhead[device] = self.overhead.get(device, 0) + nbytes
        tracked = tensor_bytes(params.values())
        if show and tracked:
            where = ", ".join(f"{_size(b)} on {d}" for d, b in sorted(self.overhead.items())) or "none"
            print(f"subnetscope: the tracker's buffers take {sum(self.overhead.values()) / tracked:.3g}x the "
                  f"{_size(tracked)} of tracked weights ({where})")

    def _load_state(self, path: Path) -> None:
        """The tracker's state from a checkpoint, refused when it was tracked against another θ0."""
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            recorded = json.loads((handle.metadata() or {}).get(FINGERPRINT_KEY, "{}"))
        problem = fingerprint_mismatch(recorded, self._theta0) if recorded else None
        if problem:
            raise SubnetscopeError(f"{path} was tracked against another θ0 than {path.parent.parent / BASE_DIR} "
                                   f"({problem}): restore the run's base/, or start afresh in a new output_dir")
        state = load_file(str(path))
        firsts = self.tracker.first_changed
        on_device = {k: v.to(firsts[k.split("::")[-1]].device) if k.split("::")[-1] in firsts else v
                     for k, v in state.items()}
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
        _write_tensors(folder / TRACKER_FILE, self._state(), {FINGERPRINT_KEY: json.dumps(self._theta0)})

    def on_optimizer_step(self, args, state, control, **kwargs):
        started = time.perf_counter()
        if self._mirror:
            self._refresh_mirror()
        record = self.tracker.update(state.global_step + 1)
        pending = self.tracker.metrics(record)
        if self.master is not None:
            master = self.master.update(record.step)
            total = sum(master.numel)
            pending.update({f"changed_master/{r}": master.total("vs_initial", r) / total for r in RULES})
        pending["time/tracker_s"] = time.perf_counter() - started
        pending["memory/tracker_bytes"] = sum(self.overhead.values())
        self._pending, self._pending_step = pending, record.step
        self.logger.log(record.step, pending)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the newest step's `subnet/*` to the trainer's log (once per step): to what the integrations
        after us receive, and to the entry Trainer.log has just appended to state.log_history."""
        if logs is None or not self._pending or self._pending_step == self._logged_step:
            return
        extra = {f"subnet/{k}": v for k, v in self._pending.items() if k.startswith(LOGGED)}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self._logged_step = self._pending_step
