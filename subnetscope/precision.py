"""How a run keeps, computes and publishes its weights, and so at what precision "changed" is judged.

    mixed  fp32 master weights and optimizer state, bf16 autocast compute, judged and checkpointed
           as bf16 roundings (what real recipes publish, and what the RL-sparsity paper measured)
    bf16   pure bf16 weights: every Adam step below half a bf16 step is lost, so update sparsity
           then measures bf16 stagnation, not fine-tuning
    fp32   everything in float32, judged in float32 unless --view_dtype says otherwise

`auto` is mixed on a CUDA GPU with bf16 support and fp32 elsewhere (a CPU's bf16 autocast is slow).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

# the flags' names and add_precision_args live in config.py (parsers load no torch); re-exported here
from .config import PRECISIONS, VIEW_DTYPE_NAMES, add_precision_args  # noqa: F401
from .errors import SubnetscopeError, warn

VIEW_DTYPES = {name: getattr(torch, name) for name in VIEW_DTYPE_NAMES}
BF16_WARNING = ("--precision bf16 updates bf16 weights directly: Adam steps below half a bf16 step are lost, so "
                "update sparsity measures bf16 stagnation, not fine-tuning (use --precision mixed for findings)")


@dataclass(frozen=True)
class Precision:
    name: str  # mixed, bf16 or fp32 (auto resolved)
    weights: torch.dtype  # dtype of the trained (master) weights and the optimizer state
    compute: torch.dtype | None  # autocast dtype of forward passes; None = the weights' own
    view: torch.dtype  # dtype at which changes are judged and checkpoints are stored

    @property
    def rounds(self) -> bool:
        """True when the published weights are roundings of the trained ones (fp32 masters)."""
        return self.view != self.weights

    def autocast(self, device: str):
        """The forward passes' autocast context (a no-op unless mixed)."""
        if self.compute is None:
            return nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.compute)

    def record(self) -> dict[str, str]:
        """What run_config.json keeps of it."""
        return {"precision": self.name, "view_dtype": str(self.view).removeprefix("torch.")}


def bf16_supported(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(spec: str, device: str, view_dtype: str | None = None) -> Precision:
    """`--precision` and `--view_dtype` checked and resolved for `device`; bf16 warns once."""
    if spec not in PRECISIONS:
        raise SubnetscopeError(f"--precision {spec!r}: use {', '.join(PRECISIONS)}")
    if view_dtype is not None and view_dtype not in VIEW_DTYPES:
        raise SubnetscopeError(f"--view_dtype {view_dtype!r}: use {', '.join(VIEW_DTYPES)}")
    name = ("mixed" if bf16_supported(device) else "fp32") if spec == "auto" else spec
    if name == "bf16":
        warn(BF16_WARNING)
    weights = torch.bfloat16 if name == "bf16" else torch.float32
    default_view = torch.float32 if name == "fp32" else torch.bfloat16
    view = VIEW_DTYPES[view_dtype] if view_dtype else default_view
    if name == "bf16" and view != torch.bfloat16:
        raise SubnetscopeError("--precision bf16 stores bf16 weights: --view_dtype must be bfloat16 (or left out)")
    return Precision(name, weights, torch.bfloat16 if name == "mixed" else None, view)
