"""Mask sets on disk: one safetensors file per set, each tensor's mask bit-packed (U8), settings in the metadata.

A mask is True where a weight is kept (pruning) or may change (subnetwork-only fine-tuning). The
file stores, per tensor, `name` -> packed bits; the metadata holds the shapes, the settings that
made the set and a fingerprint of the model's parameter names and shapes, so that a mask is never
applied to a model it was not made for.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import (
    atomic_write_file,
    pack_bits,
    read_safetensors_offsets,
    unpack_bits,
)
from .errors import SubnetscopeError

MASK_FORMAT = "subnetscope-mask/1"
MASK_REMEDY = "make it again with compute_masks.py"


def model_fingerprint(shapes: dict[str, list[int]]) -> str:
    """A short hash of every parameter's name and shape: equal for the same architecture."""
    text = json.dumps(sorted((n, list(s)) for n, s in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_of(model: torch.nn.Module) -> str:
    return model_fingerprint({n: list(p.shape) for n, p in model.named_parameters()})


@dataclass
class MaskSet:
    masks: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all tensors in the set."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0


def save_masks(path: Path, mask_set: MaskSet) -> Path:
    """Write the set atomically (temporary file, then rename)."""
    payload = {name: pack_bits(m.bool()).cpu() for name, m in mask_set.masks.items()}
    meta = {"format": MASK_FORMAT, "shapes": json.dumps({n: list(m.shape) for n, m in mask_set.masks.items()}),
            "settings": json.dumps(mask_set.settings), "fingerprint": mask_set.fingerprint}
    return atomic_write_file(path, lambda tmp: save_file(payload, str(tmp), metadata=meta))


def load_masks(path: str | Path) -> MaskSet:
    """Read a set written by `save_masks`, one tensor at a time. A file cut short or damaged is refused
    at open (header against file size), before any training or analysis starts."""
    path = Path(path)
    if not path.is_file():
        raise SubnetscopeError(f"{path} does not exist: pass a mask file written by compute_masks.py")
    read_safetensors_offsets(path, MASK_REMEDY)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MASK_FORMAT:
                raise SubnetscopeError(f"{path} is not a subnetscope mask file: make one with compute_masks.py")
            masks = {name: _unpack(f, path, name, shape) for name, shape in _mask_shapes(path, meta).items()}
            settings = json.loads(meta.get("settings", "{}"))
    except (OSError, ValueError, SafetensorError) as err:
        raise SubnetscopeError(f"{path} cannot be read as a mask file ({err}): {MASK_REMEDY}") from None
    return MaskSet(masks, settings, meta.get("fingerprint", ""))


def _mask_shapes(path: Path, meta: dict) -> dict[str, list[int]]:
    """name -> shape from the metadata; one line when it is missing or damaged."""
    try:
        shapes = json.loads(meta["shapes"])
        if all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes.values()):
            return shapes
    except (KeyError, ValueError, AttributeError):
        pass
    raise SubnetscopeError(f"{path} has damaged metadata (no valid tensor shapes): {MASK_REMEDY}")


def _unpack(handle, path: Path, name: str, shape: list[int]) -> torch.Tensor:
    """One mask from its packed bits, after checking that the file holds exactly the bits its shape needs."""
    numel = math.prod(shape)
    try:
        stored = handle.get_slice(name).get_shape()
    except SafetensorError:
        stored = None
    if stored != [(numel + 7) // 8]:
        raise SubnetscopeError(f"{path}: mask {name!r} of shape {shape} is "
                               f"{'missing' if stored is None else f'stored as {stored}'}: {MASK_REMEDY}")
    return unpack_bits(handle.get_tensor(name), numel).view(shape)


def check_masks_fit(mask_set: MaskSet, params: dict[str, torch.Tensor], label: str = "the mask",
                    same_model: bool = True) -> None:
    """Every masked tensor must exist in the model with the mask's shape, and (with `same_model`)
    the set must come from this architecture; otherwise one line that lists the misfits."""
    missing = [n for n in mask_set.masks if n not in params]
    wrong = [f"{n} (mask {list(m.shape)}, model {list(params[n].shape)})" for n, m in mask_set.masks.items()
             if n in params and m.shape != params[n].shape]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"not in the model: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if wrong:
            parts.append(f"shapes differ: {', '.join(wrong[:5])}"
                         + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
        raise SubnetscopeError(f"{label} does not match the model: {'; '.join(parts)}; make the mask from this model")
    mine = model_fingerprint({n: list(p.shape) for n, p in params.items()})
    if same_model and mask_set.fingerprint and mask_set.fingerprint != mine:
        source = mask_set.settings.get("model", "another model")
        raise SubnetscopeError(f"{label} was made for {source} (fingerprint {mask_set.fingerprint}), not this model "
                               f"({mine}): make the mask from this model with compute_masks.py")


def validation_rows(masks: dict[str, torch.Tensor], expected: dict[str, int | None]) -> list[dict]:
    """Per tensor: entries, removed expected (None where only the total is fixed) and removed in the mask."""
    rows = []
    counts = torch.stack([(~m).sum() for m in masks.values()]).tolist() if masks else []
    for (name, m), removed in zip(masks.items(), counts):
        want = expected.get(name)
        rows.append({"tensor": name, "numel": m.numel(), "expected_removed": want, "removed": removed,
                     "expected_sparsity": None if want is None else want / m.numel(),
                     "sparsity": removed / m.numel(), "match": None if want is None else want == removed})
    return rows


def validation_summary(rows: list[dict], target: float) -> dict:
    """Overall sparsity expected vs actual, and the tensors whose count differs from the plan."""
    total = sum(r["numel"] for r in rows)
    removed = sum(r["removed"] for r in rows)
    return {"target_sparsity": target, "overall_sparsity": removed / total if total else 0.0,
            "tensors": len(rows), "weights": total, "removed": removed,
            "mismatched_tensors": [r["tensor"] for r in rows if r["match"] is False]}
