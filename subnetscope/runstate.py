"""A training run's folder: θ0, step checkpoints that the analysis reads, and everything resume needs.

    run/run_config.json        settings and the model's parameter names and shapes
    run/base/                  θ0 (save_pretrained), the base of every compact checkpoint
    run/step_N/                subnet.safetensors (compact) or model.safetensors (--full_checkpoints),
                               trainer_state.pt (optimizer, RNG, step), tracker.safetensors
    run/metrics.jsonl          one JSON object per step
    run/final/                 the final model and tokenizer (save_pretrained)

Each step folder is written under a temporary name and renamed into place, so a killed run leaves
either a whole checkpoint or none, and `--resume` continues from the newest whole one.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import BASE_DIR, COMPACT_FILE, atomic_save_dir, find_step_checkpoints, save_compact
from .errors import SubnetscopeError
from .models import model_signature

TRAINER_STATE = "trainer_state.pt"
TRACKER_STATE = "tracker.safetensors"
RUN_CONFIG = "run_config.json"
EXTRA_TENSORS = "extra.safetensors"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
             "numpy": json.dumps(np.random.get_state()[1].tolist())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np.random.seed(0)
    np_state = list(np.random.get_state())
    np_state[1] = np.array(json.loads(state["numpy"]), dtype=np.uint32)
    np.random.set_state(tuple(np_state))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_run_dir(run_dir: Path, model: torch.nn.Module, tokenizer, settings: dict) -> None:
    """Write θ0 and the run's settings once, at the start of a fresh run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    base = run_dir / BASE_DIR

    def write_base(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_save_dir(base, write_base)
    config = {"settings": settings, "parameters": model_signature(model)}
    (run_dir / RUN_CONFIG).write_text(json.dumps(config, indent=1))


def check_resumable(run_dir: Path, model: torch.nn.Module) -> None:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise SubnetscopeError(f"--resume: {run_dir} is not a subnetscope run folder (no {RUN_CONFIG})")
    saved = json.loads(path.read_text())
    mine = model_signature(model)
    if saved["parameters"] != mine:
        theirs = saved["settings"].get("policy", "another model")
        raise SubnetscopeError(
            f"--resume: {run_dir} was trained from {theirs}, whose parameters differ from this --policy: "
            "resume with the same --policy, or pick a new --output_dir"
        )


def save_step(run_dir: Path, step: int, params: dict[str, torch.Tensor], changed: dict[str, torch.Tensor],
              optimizer: torch.optim.Optimizer, tracker_state: dict[str, torch.Tensor], full: bool,
              extra: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write step_N atomically: the weights (compact or full), optimizer, RNG and tracker state, and
    a trainer's own tensors (PPO's value head) in extra.safetensors."""
    folder = run_dir / f"step_{step}"

    def write(tmp: Path) -> None:
        if full:
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            save_compact(tmp / COMPACT_FILE, step, f"../{BASE_DIR}", {n: (p, changed[n]) for n, p in params.items()})
        save_file({k: v.cpu().contiguous() for k, v in tracker_state.items()}, str(tmp / TRACKER_STATE))
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA_TENSORS))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "extra": extra or {}},
                   tmp / TRAINER_STATE)

    atomic_save_dir(folder, write)
    return folder


def latest_step(run_dir: Path) -> Path | None:
    """The newest complete step folder (one with a trainer state), or None."""
    try:
        steps = find_step_checkpoints(str(run_dir))
    except SubnetscopeError:
        return None
    complete = [c for c in steps if (c.path / TRAINER_STATE).is_file()]
    return complete[-1].path if complete else None


def load_step(folder: Path, params: dict[str, torch.Tensor],
              optimizer: torch.optim.Optimizer) -> tuple[int, dict, dict, dict[str, torch.Tensor]]:
    """Restore weights, optimizer state and RNG from a step folder; returns
    (step, tracker state, the trainer's extra state, the trainer's extra tensors)."""
    from .checkpoint import open_checkpoint

    source = open_checkpoint(str(folder))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(source.get(name).to(p.device, p.dtype))
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    tracker_state = load_file(str(folder / TRACKER_STATE))
    extra_path = folder / EXTRA_TENSORS
    tensors = load_file(str(extra_path)) if extra_path.is_file() else {}
    return int(state["step"]), tracker_state, state.get("extra", {}), tensors


def ever_changed_masks(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(step, masks of the weights that changed at any step up to the newest checkpoint, the run's
    config): the subnetwork a full run used, for `--update_mask`."""
    folder = latest_step(run_dir)
    if folder is None or not (folder / TRACKER_STATE).is_file():
        raise SubnetscopeError(f"{run_dir} has no step checkpoint with tracker state: pass a main_grpo.py / "
                               "main_ppo.py run folder that has saved at least one step")
    state = load_file(str(folder / TRACKER_STATE))
    masks = {k.split("::", 1)[1]: v >= 0 for k, v in state.items() if k.startswith("first_changed::")}
    config = json.loads((run_dir / RUN_CONFIG).read_text())
    step = int(folder.name.split("_")[-1])
    return step, masks, config
