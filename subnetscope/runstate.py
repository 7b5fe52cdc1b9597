"""A training run's folder: θ0, step checkpoints that the analysis reads, and everything resume needs.

    run/run_config.json        the algorithm, settings (and their changes on resume), the model's
                               parameter names and shapes
    run/base/                  θ0 (save_pretrained), the base of every compact checkpoint
    run/step_N/                subnet.safetensors (compact) or model.safetensors (--full_checkpoints),
                               trainer_state.pt (optimizer, RNG, step), tracker.safetensors, and
                               master.safetensors (the fp32 master weights, resume state only) when
                               the weights are judged and stored rounded (--precision mixed)
    run/metrics.jsonl          one JSON object per step
    run/final/                 the final model and tokenizer (save_pretrained)

base/, step_N/ and final/ hold the weights at the view dtype (--view_dtype: what would be published).

Every file and folder is written under a temporary name, flushed to disk (fsync) and renamed into
place, so a killed run leaves either a whole checkpoint or none, and `--resume` continues from the
newest whole one. Everything a run could refuse is checked before its first byte is written.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import (
    BASE_DIR,
    COMPACT_FILE,
    EXTRA_TENSORS,
    MASTER_FILE,
    TRACKER_STATE,
    TRAINER_STATE,
    atomic_save_dir,
    atomic_write_file,
    find_step_checkpoints,
    save_compact,
)
from .errors import SubnetscopeError
from .models import model_signature
from .outputs import nearest_existing

RUN_CONFIG = "run_config.json"
FINAL_DIR = "final"
WEIGHT_FILES = (COMPACT_FILE, "model.safetensors")
STEP_FILES = (TRAINER_STATE, TRACKER_STATE)
HEADER_BYTES = 1 << 16  # safetensors headers, torch.save's zip records, JSON: a generous allowance
# What a killed write leaves: atomic_save_dir's `.step_N.xxxx` / `.step_N.old` folders, atomic_write_file's
# `.name.PID.tmp` files, and outputs.check_output_dir's probe.
STALE_TEMP = re.compile(r"^\.(?:(?:step_\d+|checkpoint-\d+|base|final)\..+|.+\.\d+\.tmp|subnetscope-write-check\..+)$")
# Settings that steer a run without changing what it measures: they may differ on --resume.
RUN_CONTROL = frozenset({"max_steps", "save_every", "save_total_limit", "eval_every", "no_tqdm", "wandb", "resume", "device",
                         "ref_device", "reward_device", "output_dir", "allow_changed_settings", "full_checkpoints",
                         "gradient_checkpointing", "log_localization"})
SCRIPTS = {"GRPO": "main_grpo.py", "PPO": "main_ppo.py", "SFT": "main_sft.py --task sft",
           "DPO": "main_sft.py --task dpo", "SFT/DPO": "main_sft.py"}


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(Path(folder).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def durable_save_dir(folder: Path, write: Callable[[Path], None]) -> None:
    """atomic_save_dir, with every file on disk before the rename: a crash (power loss, not only a
    kill) leaves the old folder or the whole new one, never an empty file under the final name."""
    def write_synced(tmp: Path) -> None:
        write(tmp)
        fsync_tree(tmp)

    atomic_save_dir(folder, write_synced)
    fsync_path(Path(folder).parent)


def durable_write_text(path: Path, text: str) -> None:
    """Replace a file through a fsync'd temporary file and a rename."""
    def write(tmp: Path) -> None:
        tmp.write_text(text)
        fsync_path(tmp)

    atomic_write_file(path, write)
    fsync_path(Path(path).parent)


def clean_stale_temps(run_dir: Path) -> list[str]:
    """Remove what killed writes left in the run folder (hidden temporary folders and files); their names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for child in sorted(run_dir.iterdir()):
        if STALE_TEMP.match(child.name):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child.name)
    return removed


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _disk_full(folder: Path, need: int) -> SubnetscopeError:
    free = shutil.disk_usage(nearest_existing(folder)).free
    newest = latest_step(folder.parent)
    kept = f"{newest.name} and the rest of the run are intact" if newest else "the run's other files are intact"
    return SubnetscopeError(f"no space left on the disk for {folder}: it needs about {_size(need)}, "
                            f"{_size(free)} free; {kept}: free some space, then continue with --resume")


def write_dir_checked(folder: Path, write: Callable[[Path], None], need: int) -> None:
    """durable_save_dir that refuses, in one line, when the disk lacks the `need` bytes (checked before
    and, as file systems reserve space differently, also when a write fails); the folder's previous
    contents and every other checkpoint stay as they were."""
    folder = Path(folder)
    if shutil.disk_usage(nearest_existing(folder.parent)).free < need:
        raise _disk_full(folder, need)
    try:
        durable_save_dir(folder, write)
    except Exception as err:  # ENOSPC arrives as OSError, SafetensorError or torch's RuntimeError
        out_of_space = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
        if out_of_space or shutil.disk_usage(nearest_existing(folder.parent)).free < need:
            raise _disk_full(folder, need) from None
        raise


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def rng_state() -> dict:
    """torch's, Python's and numpy's random states (numpy's whole: key, position and cached Gaussian, in
    JSON, which `torch.load(weights_only=True)` reads back), and CUDA's where there is a GPU."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
             "numpy": json.dumps(key.tolist()),
             "numpy_state": json.dumps([name, position, has_gauss, gauss])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states; a checkpoint written before numpy's position was kept restores
    only its key (the position of a fresh seed, as it always did)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    key = np.array(json.loads(state["numpy"]), dtype=np.uint32)
    name, position, has_gauss, cached = json.loads(state.get("numpy_state", '["MT19937", 624, 0, 0.0]'))
    np.random.set_state((name, key, position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- run_config.json: which algorithm, which settings ----

def read_run_config(run_dir: Path) -> dict:
    """The run's run_config.json; a damaged one is refused in one line that names it."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubnetscopeError(f"{path} cannot be read ({err}): it is damaged; restore it, "
                               "or start a new run in a new --output_dir") from None
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise SubnetscopeError(f"{path} has no settings: it is damaged; restore it, "
                               "or start a new run in a new --output_dir")
    return config


def write_run_config(run_dir: Path, config: dict) -> None:
    durable_write_text(Path(run_dir) / RUN_CONFIG, json.dumps(config, indent=1))


def run_algorithm(run_dir: Path, config: dict | None) -> str | None:
    """GRPO, PPO, SFT or DPO: recorded in run_config.json, or told by the settings or files of a
    folder written before it was ("SFT/DPO" for a TRL run folder without run_config.json)."""
    if config is not None:
        if config.get("algorithm"):
            return config["algorithm"]
        settings = config["settings"]
        if "group_size" in settings:
            return "GRPO"
        if "ppo_epochs" in settings:
            return "PPO"
        if "task" in settings:
            return str(settings["task"]).upper()
        return None
    run_dir = Path(run_dir)
    if (run_dir / "subnet_metrics.jsonl").is_file() or any(run_dir.glob("checkpoint-*")):
        return "SFT/DPO"
    return None


def _shown(value) -> str:
    return "none" if value is None else str(value)


def with_legacy_settings(saved: dict) -> dict:
    """A run's settings, plus what the absence of a later setting meant in a run_config.json written
    before it existed (a mask run used to train the tensors its mask did not cover)."""
    legacy = {"train_unmasked": True} if saved.get("update_mask") and "train_unmasked" not in saved else {}
    return {**saved, **legacy}


def settings_changes(saved: dict, settings: dict) -> list[tuple[str, object, object]]:
    """(setting, the run's value, the new value) for each setting that alters what the run measures."""
    saved = with_legacy_settings(saved)
    return [(k, saved[k], v) for k, v in settings.items()
            if k not in RUN_CONTROL and k in saved and saved[k] != v]


def describe_changes(changes: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"--{k} {_shown(new)} (run has {_shown(old)})" for k, old, new in changes)


def has_run_files(run_dir: Path) -> bool:
    """Whether the folder already holds (part of) a training run beyond a half-written start."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return (run_dir / RUN_CONFIG).exists() or any(
        c.is_dir() and re.fullmatch(r"(?:step_|checkpoint-)\d+", c.name) for c in run_dir.iterdir())


def check_run_folder(run_dir: Path, algorithm: str, settings: dict, resume: bool, allow_changed: bool) -> dict | None:
    """Before a run writes anything: a folder that holds a run is refused unless this is a --resume
    of the same algorithm with the same settings (or --allow_changed_settings). Returns the run's
    run_config.json when resuming one that has it."""
    run_dir = Path(run_dir)
    if not has_run_files(run_dir):
        return None
    saved = read_run_config(run_dir) if (run_dir / RUN_CONFIG).exists() else None
    theirs = run_algorithm(run_dir, saved)
    if theirs is not None and algorithm not in theirs.split("/"):
        raise SubnetscopeError(f"{run_dir} holds a {theirs} run, not a {algorithm} run: continue it with "
                               f"{SCRIPTS.get(theirs, 'the script that made it')} --resume, or pass a new --output_dir")
    if not resume:
        raise SubnetscopeError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --output_dir")
    if saved is None:
        if theirs is None:
            raise SubnetscopeError(f"--resume: {run_dir} is not a subnetscope run folder (no {RUN_CONFIG}): "
                                   "pass a run folder, or a new --output_dir")
        return None
    changes = settings_changes(saved["settings"], settings)
    if changes and not allow_changed:
        raise SubnetscopeError(f"--resume: {run_dir} was run with other settings: {describe_changes(changes)}; "
                               "resume with the run's settings, or pass --allow_changed_settings to change them "
                               f"(recorded in its {RUN_CONFIG})")
    return saved


def record_resume(run_dir: Path, saved: dict, settings: dict, step: int) -> list[tuple[str, object, object]]:
    """Bring run_config.json's settings up to date on resume; each changed setting that alters what the
    run measures is kept in `setting_changes` as {step (the last step under the old value), setting,
    old, new}. Returns those changes."""
    changes = settings_changes(saved["settings"], settings)
    history = list(saved.get("setting_changes", []))
    history += [{"step": step, "setting": k, "old": old, "new": new} for k, old, new in changes]
    config = {**saved, "settings": {**saved["settings"], **settings}}
    if history:
        config["setting_changes"] = history
    write_run_config(run_dir, config)
    return changes


def keeps_masters(settings: dict) -> bool:
    """Whether a run's step folders hold fp32 master weights: fp32 weights judged at another dtype."""
    return (settings.get("precision_used") in ("mixed", "fp32")
            and settings.get("view_dtype_used", "float32") != "float32")


def save_model(model: torch.nn.Module, folder: Path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained, with the floating-point tensors rounded to `dtype` (to nearest even, as `.to`)
    and config.json's dtype saying so: fp32 masters published as the bf16 model a recipe ships."""
    if dtype is None or all(p.dtype == dtype for p in model.parameters()):
        model.save_pretrained(folder)
        return
    rounded: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))  # tied weights stay one tensor
        if key not in rounded:
            rounded[key] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
        state[name] = rounded[key]
    model.save_pretrained(folder, state_dict=state)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def init_run_dir(run_dir: Path, model: torch.nn.Module, tokenizer, settings: dict, algorithm: str,
                 dtype: torch.dtype | None = None) -> None:
    """Write θ0 (at `dtype`, the view, when given) and the run's settings once, at the start of a fresh run."""
    run_dir.mkdir(parents=True, exist_ok=True)

    def write_base(tmp: Path) -> None:
        save_model(model, tmp, dtype)
        tokenizer.save_pretrained(tmp)

    write_dir_checked(run_dir / BASE_DIR, write_base, tensor_bytes(model.parameters()) + HEADER_BYTES)
    write_run_config(run_dir, {"algorithm": algorithm, "settings": settings, "parameters": model_signature(model)})


def check_resumable(run_dir: Path, model: torch.nn.Module, saved: dict | None = None) -> None:
    """The run must have been trained from a model with this one's parameter names and shapes."""
    saved = saved or read_run_config(run_dir)
    if "parameters" in saved and saved["parameters"] != model_signature(model):
        theirs = saved["settings"].get("policy", "another model")
        raise SubnetscopeError(
            f"--resume: {run_dir} was trained from {theirs}, whose parameters differ from this --policy: "
            "resume with the same --policy, or pick a new --output_dir"
        )


# ---- step folders ----

@dataclass
class ResumePoint:
    """The newest complete checkpoint (None: none yet) and the newer ones that are incomplete."""

    folder: Path | None
    skipped: list[Path] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(re.findall(r"\d+", self.folder.name)[-1]) if self.folder else 0

    def notes(self) -> list[str]:
        if not self.skipped:
            return []
        back = f"back to {self.folder.name}" if self.folder else "from step 0 (no complete checkpoint)"
        names = ", ".join(p.name for p in self.skipped)
        return [f"{self.skipped[0].parent}: {names} incomplete (no weights file or trainer state: a damaged "
                f"checkpoint); resuming {back}"]


def resume_point(run_dir: Path, weights: tuple[str, ...] = WEIGHT_FILES,
                 required: tuple[str, ...] = STEP_FILES) -> ResumePoint:
    """The newest step folder holding one of `weights` and all of `required`."""
    try:
        steps = find_step_checkpoints(str(run_dir))
    except SubnetscopeError:
        return ResumePoint(None)
    skipped = []
    for ckpt in reversed(steps):
        if any((ckpt.path / w).is_file() for w in weights) and all((ckpt.path / r).is_file() for r in required):
            return ResumePoint(ckpt.path, skipped[::-1])
        skipped.append(ckpt.path)
    return ResumePoint(None, skipped[::-1])


def drop_old_steps(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step folders (TRL's save_total_limit); returns what went. A folder
    is removed by renaming it out of the step_N pattern first, so a kill mid-delete leaves no half step."""
    from .checkpoint import find_step_checkpoints

    old = [c.path for c in find_step_checkpoints(str(run_dir))][:-keep]
    for folder in old:
        doomed = folder.with_name(f".{folder.name}.deleting")  # STALE_TEMP: a resume clears it
        folder.rename(doomed)
        shutil.rmtree(doomed)
    return old


def latest_step(run_dir: Path) -> Path | None:
    """The newest complete step folder (weights, trainer and tracker state), or None."""
    return resume_point(run_dir).folder


def final_is_written(run_dir: Path) -> bool:
    final = Path(run_dir) / FINAL_DIR
    return final.is_dir() and (any(final.glob("*.safetensors")) or any(final.glob("*.bin")))


def save_step(run_dir: Path, step: int, params: dict[str, torch.Tensor], changed: dict[str, torch.Tensor],
              optimizer: torch.optim.Optimizer, tracker_state: dict[str, torch.Tensor], full: bool,
              extra: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
              masters: dict[str, torch.Tensor] | None = None) -> Path:
    """Write step_N atomically and durably: the weights as judged (compact or full), optimizer, RNG and
    tracker state, a trainer's own tensors (PPO's value head) in extra.safetensors, and `masters`, the
    trained weights when `params` are their roundings, in master.safetensors. Refused in one line,
    before writing, when the disk lacks the room."""
    folder = run_dir / f"step_{step}"
    optimizer_state = optimizer.state_dict()
    if full:
        weights = tensor_bytes(params.values())
    else:
        weights = sum((p.numel() + 7) // 8 + int(changed[n].sum()) * p.element_size() for n, p in params.items())
    moments = tensor_bytes(t for s in optimizer_state["state"].values() for t in s.values())
    need = (weights + moments + tensor_bytes(tracker_state.values()) + tensor_bytes((extra_tensors or {}).values())
            + tensor_bytes((masters or {}).values()) + HEADER_BYTES)

    def write(tmp: Path) -> None:
        if full:
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            save_compact(tmp / COMPACT_FILE, step, f"../{BASE_DIR}", {n: (p, changed[n]) for n, p in params.items()})
        if masters is not None:
            save_file({n: p.detach().cpu().contiguous() for n, p in masters.items()}, str(tmp / MASTER_FILE))
        save_file({k: v.cpu().contiguous() for k, v in tracker_state.items()}, str(tmp / TRACKER_STATE))
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA_TENSORS))
        torch.save({"step": step, "optimizer": optimizer_state, "rng": rng_state(), "extra": extra or {}},
                   tmp / TRAINER_STATE)

    write_dir_checked(folder, write, need)
    return folder


def _unreadable(path: Path, err: Exception) -> SubnetscopeError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return SubnetscopeError(f"{path} cannot be read ({first}): the checkpoint {path.parent} is damaged; "
                            f"delete that folder to resume from the one before it")


def load_step(folder: Path, params: dict[str, torch.Tensor],
              optimizer: torch.optim.Optimizer) -> tuple[int, dict, dict, dict[str, torch.Tensor]]:
    """Restore weights (the fp32 masters of master.safetensors where the folder has them, else its weights),
    optimizer state and RNG from a step folder; returns (step, tracker state, the trainer's extra state,
    the trainer's extra tensors)."""
    from .checkpoint import open_checkpoint

    masters = folder / MASTER_FILE
    source = open_checkpoint(str(masters if masters.is_file() else folder))
    missing = [n for n in params if n not in set(source.names())]
    if missing:
        raise SubnetscopeError(f"{folder} lacks {len(missing)} of the model's tensors ({missing[0]}, ...): "
                               "it is damaged; delete it to resume from the checkpoint before it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(source.get(name).to(p.device, p.dtype))
    try:
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # a cut zip archive, or a state of another optimizer
        raise _unreadable(folder / TRAINER_STATE, err) from None
    set_rng_state(state["rng"])
    tracker_state = _load_tensors(folder / TRACKER_STATE)
    extra_path = folder / EXTRA_TENSORS
    tensors = _load_tensors(extra_path) if extra_path.is_file() else {}
    return int(state["step"]), tracker_state, state.get("extra", {}), tensors


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:
        raise _unreadable(path, err) from None
