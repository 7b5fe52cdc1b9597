"""A step checkpoint as a folder `from_pretrained` loads: compact `step_N/`, a TRL `checkpoint-N/`, or a
LoRA adapter checkpoint (merged onto its base).

Compact step folders hold 1 bit per weight plus the changed values and no config; an adapter folder
holds A and B. The export writes the step's whole weights (at the dtype they are judged and
stored at, merged for an adapter) beside the config, generation config and tokenizer of the run's
base/ (the model the weights belong to), under the base files' own tensor names, in safetensors
shards with an index when they exceed SHARD_BYTES. The folder is built under a temporary name and
renamed into place.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import (
    BASE_DIR,
    STATE_FILES,
    CompactSource,
    TensorSource,
    atomic_save_dir,
    canonical_name,
    open_checkpoint,
)
from .errors import SubnetscopeError
from .lora_merge import ADAPTER_CONFIG, LoraMergedSource
from .outputs import check_output_dir

SHARD_BYTES = 2 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pth", ".pt")
TRAINER_FILES = ("trainer_state.json", ADAPTER_CONFIG)  # a trainer's or an adapter's, not the model's


def model_folder(step_dir: Path, source: TensorSource, base: str | None) -> Path:
    """The folder whose config and tokenizer go with the step's weights: --base, else the base a compact or
    adapter checkpoint is read against, else the step folder itself when it has a config, else its run's base/."""
    if base is not None:
        folder = Path(base)
    elif isinstance(source, (CompactSource, LoraMergedSource)):
        folder = Path(source.base.label)
    elif (step_dir / "config.json").is_file():
        folder = step_dir
    else:
        folder = step_dir.parent / BASE_DIR
    if not (folder / "config.json").is_file():
        raise SubnetscopeError(f"{folder} has no config.json to go with {step_dir}'s weights: pass --base, a model "
                               "folder of the run's model")
    return folder


def original_names(folder: Path) -> dict[str, str]:
    """canonical name -> the name the model folder's weight files use (Gemma-3n keeps its text model under
    another prefix), so the export loads like the base."""
    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name in STATE_FILES:
            continue
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names.update({canonical_name(k): k for k in handle.keys()})
    return names


def _write_weights(tmp: Path, source: TensorSource, names: dict[str, str]) -> None:
    """The source's tensors, one shard at a time (at most SHARD_BYTES each, one tensor per shard at least)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in source.names():
        nbytes = source.numel(name) * source.dtype(name).itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {names.get(n, n): source.get(n).contiguous() for n in shard}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({key: file for key in tensors})
    if len(files) > 1:
        total = sum(source.numel(n) * source.dtype(n).itemsize for n in source.names())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_step(step_dir: str | Path, output_dir: str | Path, base: str | None = None) -> Path:
    """Write `step_dir`'s weights with its model's config and tokenizer as a save_pretrained folder."""
    step_dir, out = Path(step_dir), check_output_dir(output_dir)
    if out.exists() and any(out.iterdir()):
        raise SubnetscopeError(f"--output_dir {out} already holds files: pass a new folder")
    if not step_dir.is_dir():
        raise SubnetscopeError(f"--step_dir {step_dir} is not a folder: pass a run's step_N or checkpoint-N")
    source = open_checkpoint(str(step_dir), base=base)
    folder = model_folder(step_dir, source, base)
    names = original_names(folder)

    def write(tmp: Path) -> None:
        for path in folder.iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in TRAINER_FILES:
                shutil.copy2(path, tmp / path.name)
        with torch.no_grad():
            _write_weights(tmp, source, names)

    atomic_save_dir(out, write)
    return out
