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

Under FSDP2 (`fully_shard`: each parameter a DTensor sharded over one mesh of all processes) each
process tracks its own shard and the per-tensor counts and sums are all-reduced (maxima by MAX), so every
process holds the model's counts; θ0 for base/, the tracker's state and the compact checkpoint are
gathered to process 0, which writes them. FSDP1's flat parameters and DeepSpeed ZeRO-3's partitions are
refused in one line, as are LoRA, `reference` and meshes other than one dimension under FSDP2.

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
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
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
from .rundir import HEADER_BYTES, TRL_PREFIX, RunDir, fsync_path, save_model, tensor_bytes
from .tracker import StepCounts, UpdateTracker

TRACKER_FILE = TRL_TRACKER_STATE
MASTER_BASE_FILE = "subnet_master_base.safetensors"  # θ0 of the fp32 weights, when base/ holds a rounding
FINGERPRINT_KEY = "theta0_fingerprint"  # tracker files' metadata: θ0 they were tracked against
LOGGED = ("changed/", "changed_master/", "sparsity/", "time/")  # what goes to the trainer's logs as subnet/*
FSDP1_PREFIX = "_fsdp_wrapped_module"  # FSDP1 with use_orig_params: plain tensors under its wrapper's names


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


def _refuse_sharded(params: dict[str, torch.Tensor], lora: bool = False) -> None:
    """FSDP1's flat parameters and DeepSpeed ZeRO-3's partitions do not say which entries a process holds;
    FSDP2's DTensors do (`_Shards`), except under LoRA, whose tracker reads the modules' whole weights."""
    for name, p in params.items():
        if lora and type(p).__name__ == "DTensor":
            raise SubnetscopeError(f"the LoRA run's base weights are sharded by FSDP2 ({name}): SubnetTrackerCallback "
                                   "tracks LoRA under DDP or one process; or train the full model under FSDP2")
        if (type(p).__name__ == "FlatParameter" or hasattr(p, "ds_id") or getattr(p, "_is_flat_param", False)
                or FSDP1_PREFIX in name):
            raise SubnetscopeError(f"the model's parameters are sharded ({name}: FSDP or DeepSpeed ZeRO-3) as flat or "
                                   "partitioned parameters: SubnetTrackerCallback counts FSDP2's shards (fully_shard, "
                                   "accelerate's fsdp_version: 2), DDP or one process; or compare saved full "
                                   "checkpoints with analyze_sparse_subnetwork.py")


def _local(p: torch.Tensor) -> torch.Tensor:
    """The entries of a parameter this process holds: an FSDP2 DTensor's shard, a plain tensor itself."""
    return p.to_local().detach() if type(p).__name__ == "DTensor" else p


class _Shards:
    """FSDP2's parameters: DTensors sharded over a one-dimensional mesh of all processes. Each process
    tracks its shard; counts and sums add up across shards exactly, maxima by MAX; per-entry tensors
    (θ0, the tracker's state, masks) are gathered to write and sliced back on resume. Collectives:
    every process calls every method."""

    def __init__(self, params: dict[str, torch.Tensor]):
        from torch.distributed.tensor import Shard

        sharded = next(n for n, p in params.items() if type(p).__name__ == "DTensor")
        self.mesh = params[sharded].device_mesh
        for name, p in params.items():
            if type(p).__name__ != "DTensor":
                raise SubnetscopeError(f"{name} is a whole tensor beside FSDP2 shards ({sharded}): "
                                       "SubnetTrackerCallback counts a model sharded throughout; fully_shard the root")
            if (p.device_mesh != self.mesh or self.mesh.ndim != 1 or self.mesh.size() != dist.get_world_size()
                    or len(p.placements) != 1 or not isinstance(p.placements[0], Shard)):
                raise SubnetscopeError(f"{name} is laid out as {p.placements} over {p.device_mesh}: "
                                       "SubnetTrackerCallback counts FSDP2 shards over one mesh dimension of all "
                                       "processes (not HSDP or tensor parallel); track under plain FSDP2 or DDP")
        self.params = params
        self.local = {n: _local(p) for n, p in params.items()}
        self.group = self.mesh.get_group()
        self.device = torch.device(self.mesh.device_type)
        self.writer = dist.get_rank() == 0

    @staticmethod
    def of(params: dict[str, torch.Tensor]) -> _Shards | None:
        """The shards when FSDP2 shards the parameters, None when each process holds them whole."""
        return _Shards(params) if any(type(p).__name__ == "DTensor" for p in params.values()) else None

    @torch.no_grad()
    def full(self, name: str, local: torch.Tensor) -> torch.Tensor | None:
        """A per-entry tensor laid out like parameter `name`'s shard, whole, on CPU in process 0 (None elsewhere)."""
        from torch.distributed.tensor import DTensor

        p = self.params[name]
        narrow = local.element_size() == 2  # gloo gathers no 16-bit integers: their bits travel as int32
        sent = local.view(torch.int16).to(torch.int32) if narrow else local
        whole = DTensor.from_local(sent, self.mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        if not self.writer:
            return None
        return whole.to(torch.int16).view(local.dtype).cpu() if narrow else whole.cpu()

    def shard(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This process's part of a whole tensor shaped like parameter `name` (no communication)."""
        from torch.distributed.tensor import distribute_tensor

        p = self.params[name]
        return distribute_tensor(whole, self.mesh, p.placements, src_data_rank=None).to_local()

    @torch.no_grad()
    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with its shards gathered, on CPU in process 0 (empty elsewhere); tied weights
        stay one tensor, as save_pretrained expects (keyed by the module's own objects: the same on every process)."""
        owner = {n: id(t) for n, t in model.named_parameters(remove_duplicate=False)}
        owner.update({n: id(t) for n, t in model.named_buffers(remove_duplicate=False)})
        gathered: dict[int | str, torch.Tensor | None] = {}
        state = {}
        for name, t in model.state_dict().items():
            key = owner.get(name, name)
            if key not in gathered:
                whole = t.full_tensor() if type(t).__name__ == "DTensor" else t.detach()
                gathered[key] = whole.cpu() if self.writer else None
            if self.writer:
                state[name] = gathered[key]
        return state

    def from_writer(self, obj):
        """Process 0's `obj` on every process."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def reduce(self, record: StepCounts) -> StepCounts:
        """The model's counts from each process's counts of its shard, in place (and in the tracker's history):
        counts, Σ|Δ| and Σ|Δ|² summed, max |Δ| the largest, sizes the whole tensors'."""
        sums = [*(record.vs_initial[r] for r in RULES), *(record.vs_previous[r] for r in RULES),
                record.ever_changed, record.nonfinite, record.abs_sum, record.abs_sq_sum]
        table = torch.tensor(sums, dtype=torch.float64, device=self.device)  # counts stay exact below 2**53
        maxima = torch.tensor(record.abs_max, dtype=torch.float64, device=self.device)
        dist.all_reduce(table, group=self.group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.group)
        rows = table.cpu().tolist()
        ints = [[int(v) for v in row] for row in rows[:2 * len(RULES) + 2]]
        record.vs_initial = dict(zip(RULES, ints[:len(RULES)]))
        record.vs_previous = dict(zip(RULES, ints[len(RULES):2 * len(RULES)]))
        record.ever_changed, record.nonfinite = ints[2 * len(RULES):]
        record.abs_sum, record.abs_sq_sum = rows[2 * len(RULES) + 2:]
        record.abs_max = maxima.cpu().tolist()
        record.numel = [self.params[n].numel() for n in record.names]
        return record


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
        self._shards: _Shards | None = None  # under FSDP2

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
            _refuse_sharded(params, lora=True)
            self._start_lora(out, model, processing_class, params, state)
        else:
            params = {_strip_wrapper(n): p for n, p in model.named_parameters() if p.requires_grad}
            _refuse_sharded(params)
            self._shards = _Shards.of(params)
            if self._shards is not None and self.reference is not None:
                raise SubnetscopeError("under FSDP2 the reference model cannot share θ0 (the tracker holds shards of "
                                       "it): leave reference out")
            self._start_full(out, model, processing_class, params, state)
        saved = RunDir(out, TRL_PREFIX).step_dir(state.global_step) / TRACKER_FILE
        if state.global_step > 0 and saved.is_file():
            self._load_state(saved)
        self.logger = MetricsLogger(out, None, {}, resume_step=state.global_step,
                                    enabled=state.is_world_process_zero, filename="subnet_metrics.jsonl")
        tracked = self._shards.local if self._shards is not None else params
        self._report_overhead(tracked, [model, self.reference], state.is_world_process_zero)

    def _start_full(self, out: Path, model, processing_class, params: dict[str, torch.Tensor], state) -> None:
        rounds = self.view_dtype is not None and any(p.dtype != self.view_dtype for p in params.values())
        view = self.view_dtype if rounds else None
        local = self._shards.local if self._shards is not None else params
        tracked = self._make_mirror(local) if self.offload else local
        initial = master_initial = None
        if state.global_step > 0:  # θ0 is the saved base, not the weights the trainer just restored
            initial, master_initial = self._saved_theta0(out, params, tracked, rounds, state.global_step)
        elif self._shards is None:
            self._theta0 = fingerprint(params, self._judged_dtype(params))
            self._check_stale_base(out, params)
            if state.is_world_process_zero:
                self._write_base(out, model, processing_class, params, rounds)
        else:
            whole = self._shards.full_state(model)
            theta0 = {n: whole[n] for n in params} if self._shards.writer else {}
            self._theta0 = self._shards.from_writer(fingerprint(theta0, self._judged_dtype(params)))
            self._check_stale_base(out, params)
            if state.is_world_process_zero:
                self._write_base(out, model, processing_class, theta0, rounds, whole)
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

    def _part(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """What this process tracks of a whole tensor shaped like parameter `name`: all of it, or its shard."""
        return self._shards.shard(name, whole) if self._shards is not None else whole

    def _saved_theta0(self, out: Path, params: dict[str, torch.Tensor], tracked: dict[str, torch.Tensor], rounds: bool,
                      step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """θ0 of a resumed run (at the view) from base/, and of the fp32 weights when the view rounds them,
        as the tracker holds the weights (`tracked`: on its device, a shard under FSDP2)."""
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
        initial = {n: self._part(n, base.get(n)).to(p.device, judged) for n, p in tracked.items()}
        if not rounds:
            return initial, None
        masters = out / MASTER_BASE_FILE
        if not masters.is_file():
            raise SubnetscopeError(f"{masters} (θ0 of the fp32 weights) is missing: the run did not start judging at "
                                   "a rounding; resume with the view_dtype it started with")
        master = load_file(str(masters))
        return initial, {n: self._part(n, master[n]).to(p.device, p.dtype) for n, p in tracked.items()}

    def _check_stale_base(self, out: Path, params: dict[str, torch.Tensor]) -> None:
        """A fresh start rewrites base/ from its own weights; beside the trainer's checkpoints of another
        model (names, shapes or values: the fingerprint) it refuses, rather than mix two runs in one folder.
        With save_base=False, base/ must already be this θ0."""
        base_dir = out / BASE_DIR
        if not base_dir.is_dir():
            return
        checkpoints = [c.path.name for c in RunDir(out, TRL_PREFIX).steps() if c.path.name.startswith(TRL_PREFIX)]
        if not checkpoints and self.save_base:
            return  # a killed start's leftover: replaced below
        problem = _base_mismatch(base_dir, params, self._theta0)
        if problem and checkpoints:
            raise SubnetscopeError(f"{out} holds {', '.join(checkpoints)} of another model ({base_dir}: {problem}): "
                                   "pass a new output_dir, or delete that run first")
        if problem:
            raise SubnetscopeError(f"{base_dir} is not this model's θ0 ({problem}) and save_base=False keeps it: "
                                   "write the model's θ0 there, or pass a new output_dir")

    def _write_base(self, out: Path, model, processing_class, params: dict[str, torch.Tensor], rounds: bool,
                    whole: dict[str, torch.Tensor] | None = None) -> None:
        """θ0 at the view dtype as base/ (what would be published), and the fp32 θ0 beside it when the view
        rounds; both replace what a killed start left. `whole`: a sharded model's gathered state dict."""
        out.mkdir(parents=True, exist_ok=True)
        if rounds:
            _write_tensors(out / MASTER_BASE_FILE, params)
        else:
            (out / MASTER_BASE_FILE).unlink(missing_ok=True)
        if not self.save_base:
            return

        def write(tmp: Path) -> None:
            if whole is None:
                save_model(model, tmp, self.view_dtype)
            else:
                save_model(model, tmp, self.view_dtype if rounds else None, state_dict=whole)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)

        view_size = torch.empty((), dtype=self._judged_dtype(params)).element_size()
        need = sum(p.numel() for p in params.values()) * view_size + HEADER_BYTES
        RunDir(out, TRL_PREFIX).write_base(write, need)

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

        RunDir(out, TRL_PREFIX).write_base(write, tensor_bytes(state.values()) + HEADER_BYTES)

    def _report_overhead(self, params: dict[str, torch.Tensor], models: list, show: bool) -> None:
        """The bytes of the tracker's own buffers per device (storages of the models' parameters, a shared θ0
        included, are not counted), printed once against the tracked weights' bytes."""
        owned = {_local(p).untyped_storage().data_ptr() for m in models if m is not None for p in m.parameters()}
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
        on_device = {k: self._part(k.split("::")[-1], v).to(firsts[k.split("::")[-1]].device)
                     if k.split("::")[-1] in firsts else v for k, v in state.items()}
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

    def _whole(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-entry tensors keyed `...::<parameter>` (or by the parameter), whole: gathered under FSDP2."""
        if self._shards is None:
            return tensors
        return {k: self._shards.full(k.split("::")[-1], v) for k, v in tensors.items()}

    def on_save(self, args, state, control, **kwargs):
        """Keep the tracker's state beside the trainer's checkpoint, for resume_from_checkpoint (written
        last: it marks the checkpoint complete); with a rounding view, the published weights first. Under
        FSDP2 every process gathers its shards, process 0 writes."""
        folder = RunDir(args.output_dir, TRL_PREFIX).step_dir(state.global_step)
        writes = state.is_world_process_zero and folder.is_dir()
        if not (writes or self._shards is not None):
            return
        if self.master is not None:
            masks = self._whole(self.tracker.exact_masks())
            published = self._whole({n: self.tracker.published(n) for n in self.tracker.params})
            tensors = {n: (published[n], masks[n]) for n in self.tracker.params}
        tracker_state = self._whole(self._state())
        if not writes:
            return
        if self.master is not None:
            _durable_file(folder / COMPACT_FILE, lambda tmp: save_compact(tmp, state.global_step, f"../{BASE_DIR}",
                                                                           tensors))
        _write_tensors(folder / TRACKER_FILE, tracker_state, {FINGERPRINT_KEY: json.dumps(self._theta0)})

    def _counts(self, tracker: UpdateTracker, step: int) -> StepCounts:
        """The tracker's step: the model's counts, summed over the processes' shards under FSDP2."""
        record = tracker.update(step)
        return self._shards.reduce(record) if self._shards is not None else record

    def on_optimizer_step(self, args, state, control, **kwargs):
        started = time.perf_counter()
        if self._mirror:
            self._refresh_mirror()
        record = self._counts(self.tracker, state.global_step + 1)
        pending = self.tracker.metrics(record)
        if self.master is not None:
            master = self._counts(self.master, record.step)
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
