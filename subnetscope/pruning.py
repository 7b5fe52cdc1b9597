"""Gradual magnitude pruning during training, and what happens to the pruned weights afterwards.

Three phases: warm-up (dense), gradual pruning (the level ramps to the target over
`applications` prunings) and finalization at the target. Between prunings the weights are zeroed,
not frozen, so the optimizer may revive them; the revival rate measures how many came back. From
the last pruning on, the mask is held (the finalization phase keeps the target sparsity), and
with `hard_mask` it is held from the first pruning. `torch.nn.utils.prune` is not used: it
compounds repeated amounts and keeps a permanent mask, so nothing could revive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from .config import check_prune_schedule
from .errors import SubnetscopeError
from .metrics import effective_rank
from .naming import block_index


@dataclass(frozen=True)
class PruneSchedule:
    """`applications` prunings evenly spaced from warmup_ratio·T to final_prune_ratio·T, the level
    ramping to `target` linearly or as Zhu & Gupta's cubic s·(1 − (1 − i/n)³)."""

    target: float
    total_steps: int
    warmup_ratio: float
    final_prune_ratio: float
    applications: int
    ramp: str = "linear"

    def validate(self) -> None:
        check_prune_schedule(self.target, self.warmup_ratio, self.final_prune_ratio, self.applications, self.ramp)
        steps = self.application_steps()
        if len(set(steps)) != len(steps):
            raise SubnetscopeError(
                f"the pruning window holds {round((self.final_prune_ratio - self.warmup_ratio) * self.total_steps)} "
                f"of {self.total_steps} steps, too few for {self.applications} prune_applications: train longer "
                "(epochs), widen the window or prune fewer times"
            )

    def application_steps(self) -> list[int]:
        start = self.warmup_ratio * self.total_steps
        end = self.final_prune_ratio * self.total_steps
        n = self.applications
        return [max(1, round(start + (end - start) * i / n)) for i in range(1, n + 1)]

    def level(self, i: int) -> float:
        """The sparsity of application i (1-based)."""
        frac = i / self.applications
        return self.target * frac if self.ramp == "linear" else self.target * (1.0 - (1.0 - frac) ** 3)

    def plan(self) -> dict[int, float]:
        """step → sparsity level applied after that step's update."""
        return {step: self.level(i) for i, step in enumerate(self.application_steps(), start=1)}

    def phase(self, step: int) -> str:
        """warmup (before the first pruning), pruning (up to and including the last one, whose
        step reaches the target) or finalization (after it: the target held fixed)."""
        steps = self.application_steps()
        if step < steps[0]:
            return "warmup"
        return "pruning" if step <= steps[-1] else "finalization"


def prunable_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The weights of the linear layers (GPT-2's Conv1D included); embeddings, norms, biases and
    the LM head (tied to the embedding) are never pruned."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not module_name.endswith("lm_head"):
            found[f"{module_name}.weight"] = module.weight
    return found


@torch.no_grad()
def magnitude_prune_(weights: dict[str, torch.Tensor], level: float) -> dict[str, torch.Tensor]:
    """Zero the round(level·n) smallest-magnitude entries of every tensor, in place; returns the
    masks of the entries that are zero afterwards (those pruned now and any already zero)."""
    masks = {}
    for name, w in weights.items():
        flat = w.view(-1)
        k = round(level * flat.numel())
        if k > 0:
            flat[torch.topk(flat.abs(), k, largest=False).indices] = 0
        masks[name] = w == 0
    return masks


@torch.no_grad()
def reapply_masks_(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Keep masked entries at zero (the hard-mask contrast)."""
    for name, w in weights.items():
        if name in masks:
            w.masked_fill_(masks[name], 0)


@torch.no_grad()
def revival_rate(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float | None:
    """Fraction of the entries zeroed at the last application that are non-zero now."""
    if not masks:
        return None
    zeroed, revived = torch.stack([
        torch.stack([m.sum(), ((weights[n] != 0) & m).sum()]) for n, m in masks.items()
    ]).sum(0).tolist()  # one host sync for all tensors
    return revived / zeroed if zeroed else None


@torch.no_grad()
def zeroed_grad_norms(weights: dict[str, torch.Tensor],
                      masks: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """‖∇‖ over the zeroed entries, in all and per tensor: the pull that would revive them."""
    names = [n for n in masks if weights[n].grad is not None]
    if not names:
        return 0.0, {}
    squares = torch.stack([weights[n].grad.double().square().masked_fill(~masks[n], 0).sum() for n in names])
    per_tensor = dict(zip(names, squares.tolist()))  # one host sync for all tensors
    return math.sqrt(sum(per_tensor.values())), {n: math.sqrt(v) for n, v in per_tensor.items()}


def _dead_lines(matrix: torch.Tensor) -> torch.Tensor:
    """[all-zero rows, all-zero columns] as a tensor (no host sync)."""
    nonzero = matrix != 0
    return torch.stack([(~nonzero.any(1)).sum(), (~nonzero.any(0)).sum()])


def dead_rows_cols(matrix: torch.Tensor) -> tuple[int, int]:
    """Rows and columns that are entirely zero."""
    rows, cols = _dead_lines(matrix).tolist()
    return rows, cols


@torch.no_grad()
def structure_metrics(weights: dict[str, torch.Tensor], with_rank: bool = True) -> dict[str, float]:
    """Overall, per-layer and per-matrix (`layer_sparsity/<tensor>`) sparsity, dead rows/columns
    per layer and effective rank per matrix."""
    per_tensor = torch.stack([torch.cat([(w == 0).sum().reshape(1), _dead_lines(w)]) for w in weights.values()])
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    dead: dict[str, int] = {}
    metrics: dict[str, float] = {}
    for (name, w), (z, rows, cols) in zip(weights.items(), per_tensor.tolist()):  # one host sync
        block = block_index(name)
        layer = f"layer_{block}" if block is not None else "other"
        zeros[layer] = zeros.get(layer, 0) + z
        sizes[layer] = sizes.get(layer, 0) + w.numel()
        dead[layer] = dead.get(layer, 0) + rows + cols
        metrics[f"layer_sparsity/{name}"] = z / w.numel()
        if with_rank:
            metrics[f"effective_rank/{name}"] = effective_rank(w)
    metrics["sparsity/overall"] = sum(zeros.values()) / sum(sizes.values())
    for layer in zeros:
        metrics[f"sparsity/{layer}"] = zeros[layer] / sizes[layer]
        metrics[f"dead_neurons/{layer}"] = dead[layer]
    return metrics


def slope(steps: list[int], values: list[float]) -> float | None:
    """Least-squares slope per step (the sparsity trend)."""
    if len(steps) < 2:
        return None
    return float(np.polyfit(np.asarray(steps, dtype=float), np.asarray(values, dtype=float), 1)[0])
