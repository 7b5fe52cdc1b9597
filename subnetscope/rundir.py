"""A training run's folder, for every trainer here: θ0, step checkpoints written atomically, the newest
complete one found for resume, the final model, and the metrics.

Two step layouts, both read alike by every reader (checkpoint.find_step_checkpoints):

    run/step_N/          the RL trainers (main_grpo.py, main_ppo.py; runstate.py says what a step holds)
    run/checkpoint-N/    TRL's trainers (baselines, pretrain), pruning and sparse fine-tuning

and beside them run/base/ (θ0, save_pretrained), run/final/ (the final model) and run/metrics.jsonl
(subnet_metrics.jsonl for TRL runs). A step folder is built under a temporary name and renamed into
place, so a killed run leaves a whole step or none; `latest` finds the newest complete one.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (
    BASE_DIR,
    COMPACT_FILE,
    TRACKER_STATE,
    TRAINER_STATE,
    StepCheckpoint,
    atomic_save_dir,
    atomic_write_file,
    find_step_checkpoints,
)
from .errors import SubnetscopeError
from .logger import read_metrics
from .models import model_signature
from .outputs import nearest_existing

RUN_CONFIG = "run_config.json"
FINAL_DIR = "final"
STEP_PREFIX = "step_"  # the RL trainers' step folders
TRL_PREFIX = "checkpoint-"  # TRL's, pruning's and sparse fine-tuning's
WEIGHT_FILES = (COMPACT_FILE, "model.safetensors")
STEP_FILES = (TRAINER_STATE, TRACKER_STATE)
HEADER_BYTES = 1 << 16  # safetensors headers, torch.save's zip records, JSON: a generous allowance
# What a killed write leaves: atomic_save_dir's `.step_N.xxxx` / `.step_N.old` folders, atomic_write_file's
# `.name.PID.tmp` files, and outputs.check_output_dir's probe.
STALE_TEMP = re.compile(r"^\.(?:(?:step_\d+|checkpoint-\d+|base|final)\..+|.+\.\d+\.tmp|subnetscope-write-check\..+)$")


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


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _disk_full(folder: Path, need: int) -> SubnetscopeError:
    free = shutil.disk_usage(nearest_existing(folder)).free
    newest = RunDir(folder.parent).latest().folder
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


def save_model(model: torch.nn.Module, folder: Path, dtype: torch.dtype | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained, with the floating-point tensors rounded to `dtype` (to nearest even, as `.to`)
    and config.json's dtype saying so: fp32 masters published as the bf16 model a recipe ships.
    `state_dict`: the tensors to save instead of the model's own (an FSDP2 model's, gathered whole)."""
    if dtype is None or (state_dict is None and all(p.dtype == dtype for p in model.parameters())):
        model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
        return
    rounded: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))  # tied weights stay one tensor
        if key not in rounded:
            rounded[key] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
        state[name] = rounded[key]
    model.save_pretrained(folder, state_dict=state)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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


class RunDir:
    """One run folder: its step folders are named `<prefix>N` (STEP_PREFIX or TRL_PREFIX), and any
    of both layouts is found by `steps` and `latest`, so old run folders keep reading."""

    def __init__(self, path: str | Path, prefix: str = STEP_PREFIX):
        self.path = Path(path)
        self.prefix = prefix

    def step_dir(self, step: int) -> Path:
        return self.path / f"{self.prefix}{step}"

    def steps(self) -> list[StepCheckpoint]:
        """The step folders, oldest first ([] when there are none or no folder)."""
        try:
            return find_step_checkpoints(str(self.path))
        except SubnetscopeError:
            return []

    def holds_run(self) -> bool:
        """Whether the folder already holds (part of) a training run beyond a half-written start."""
        if not self.path.is_dir():
            return False
        return (self.path / RUN_CONFIG).exists() or bool(self.steps())

    def latest(self, required: tuple[str, ...] = STEP_FILES, one_of: tuple[str, ...] = WEIGHT_FILES) -> ResumePoint:
        """The newest step folder holding all of `required` and, unless it is empty, one of `one_of`
        (a trainer's weights); the newer incomplete ones are `skipped`."""
        skipped = []
        for ckpt in reversed(self.steps()):
            if ((not one_of or any((ckpt.path / w).is_file() for w in one_of))
                    and all((ckpt.path / r).is_file() for r in required)):
                return ResumePoint(ckpt.path, skipped[::-1])
            skipped.append(ckpt.path)
        return ResumePoint(None, skipped[::-1])

    def save_step(self, step: int, write: Callable[[Path], None], need: int | None = None) -> Path:
        """Write the step's folder through `write(tmp)` into a temporary folder renamed into place; with
        `need` (bytes), durably (fsync'd) and refused in one line when the disk lacks the room."""
        folder = self.step_dir(step)
        self._write_dir(folder, write, need)
        return folder

    def create(self, model: torch.nn.Module, tokenizer, dtype: torch.dtype | None = None) -> None:
        """Write θ0 (at `dtype`, the view, when given) as base/, once, at the start of a fresh run."""
        self.path.mkdir(parents=True, exist_ok=True)

        def write_base(tmp: Path) -> None:
            save_model(model, tmp, dtype)
            tokenizer.save_pretrained(tmp)

        self.write_base(write_base, tensor_bytes(model.parameters()) + HEADER_BYTES)

    def write_base(self, write: Callable[[Path], None], need: int) -> None:
        """Write base/ (θ0) durably through `write(tmp)`, replacing what a killed start left."""
        write_dir_checked(self.path / BASE_DIR, write, need)

    def check_resumable(self, model: torch.nn.Module, saved: dict) -> None:
        """The run (its run_config.json, `saved`) must have been trained from a model with this one's
        parameter names and shapes."""
        if "parameters" in saved and saved["parameters"] != model_signature(model):
            theirs = saved["settings"].get("policy", "another model")
            raise SubnetscopeError(
                f"--resume: {self.path} was trained from {theirs}, whose parameters differ from this --policy: "
                "resume with the same --policy, or pick a new --output_dir"
            )

    def finalize(self, write: Callable[[Path], None], need: int | None = None) -> Path:
        """Write final/ as `save_step` writes a step."""
        folder = self.path / FINAL_DIR
        self._write_dir(folder, write, need)
        return folder

    def final_is_written(self) -> bool:
        final = self.path / FINAL_DIR
        return final.is_dir() and (any(final.glob("*.safetensors")) or any(final.glob("*.bin")))

    def drop_old_steps(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` step folders (TRL's save_total_limit); returns what went. A folder
        is removed by renaming it out of the step pattern first, so a kill mid-delete leaves no half step."""
        old = [c.path for c in self.steps()][:-keep]
        for folder in old:
            doomed = folder.with_name(f".{folder.name}.deleting")  # STALE_TEMP: a resume clears it
            folder.rename(doomed)
            shutil.rmtree(doomed)
        return old

    def clean_stale_temps(self) -> list[str]:
        """Remove what killed writes left in the run folder (hidden temporary folders and files); their names."""
        if not self.path.is_dir():
            return []
        removed = []
        for child in sorted(self.path.iterdir()):
            if STALE_TEMP.match(child.name):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                removed.append(child.name)
        return removed

    def metrics(self, filename: str = "metrics.jsonl") -> list[dict]:
        """The run's metrics records, in order ([] before the first)."""
        path = self.path / filename
        return read_metrics(path) if path.is_file() else []

    @staticmethod
    def _write_dir(folder: Path, write: Callable[[Path], None], need: int | None) -> None:
        if need is None:
            atomic_save_dir(folder, write)
        else:
            write_dir_checked(folder, write, need)
