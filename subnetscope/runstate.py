"""What an RL run's folder (rundir.RunDir) holds: θ0, step checkpoints that the analysis reads, and
everything resume needs.

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

import json
import random
from pathlib import Path

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
    save_compact,
)
from .errors import SubnetscopeError
from .models import model_signature
from .rundir import HEADER_BYTES, RUN_CONFIG, TRL_PREFIX, RunDir, durable_write_text, tensor_bytes

# Settings that steer a run without changing what it measures: they may differ on --resume.
RUN_CONTROL = frozenset({"max_steps", "save_every", "save_total_limit", "eval_every", "no_tqdm", "wandb", "resume",
                         "device", "ref_device", "reward_device", "output_dir", "allow_changed_settings",
                         "full_checkpoints", "gradient_checkpointing", "log_localization"})
SCRIPTS = {"GRPO": "main_grpo.py", "PPO": "main_ppo.py", "SFT": "main_sft.py --task sft",
           "DPO": "main_sft.py --task dpo", "SFT/DPO": "main_sft.py"}


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


def write_new_run_config(run_dir: Path, algorithm: str, settings: dict, model: torch.nn.Module) -> None:
    """A fresh run's run_config.json: its algorithm, settings, and the model's parameter names and shapes
    (what a resume must match)."""
    write_run_config(run_dir, {"algorithm": algorithm, "settings": settings, "parameters": model_signature(model)})


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
    if (run_dir / "subnet_metrics.jsonl").is_file() or any(
            c.path.name.startswith(TRL_PREFIX) for c in RunDir(run_dir).steps()):
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


def check_run_folder(run_dir: Path, algorithm: str, settings: dict, resume: bool, allow_changed: bool) -> dict | None:
    """Before a run writes anything: a folder that holds a run is refused unless this is a --resume
    of the same algorithm with the same settings (or --allow_changed_settings). Returns the run's
    run_config.json when resuming one that has it."""
    run_dir = Path(run_dir)
    if not RunDir(run_dir).holds_run():
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


def save_rl_step(run: RunDir, step: int, params: dict[str, torch.Tensor], changed: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, tracker_state: dict[str, torch.Tensor], full: bool,
                 extra: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                 masters: dict[str, torch.Tensor] | None = None) -> Path:
    """Write step_N atomically and durably: the weights as judged (compact or full), optimizer, RNG and
    tracker state, a trainer's own tensors (PPO's value head) in extra.safetensors, and `masters`, the
    trained weights when `params` are their roundings, in master.safetensors. Refused in one line,
    before writing, when the disk lacks the room."""
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

    return run.save_step(step, write, need)


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
