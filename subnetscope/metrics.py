"""Metrics on per-block counts, update matrices, subnetwork overlaps and MatFormer shells.

Pure functions of numbers and tensors, shared by the tracker (in the training loop) and the
analysis CLIs, so the same definition produces every figure. An undefined value (the Gini of
blocks that saw no change at all) is ``None``, never a made-up 0.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if (arr < 0).any():
        raise ValueError("concentration metrics need non-negative values")
    return arr


def gini(values: Sequence[float] | np.ndarray) -> float | None:
    """Gini coefficient: 0 when every block changed equally, (n-1)/n when one block holds all."""
    x = np.sort(_as_array(values))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return None
    ranks = np.arange(1, n + 1)
    return float(((2 * ranks - n - 1) * x).sum() / (n * total))


def normalized_entropy(values: Sequence[float] | np.ndarray) -> float | None:
    """Shannon entropy of the share per block over log(n): 1 = uniform, 0 = all in one block."""
    x = _as_array(values)
    total = x.sum()
    if x.size < 2 or total <= 0:
        return None
    p = x[x > 0] / total
    return max(0.0, float(-(p * np.log(p)).sum() / math.log(x.size)))


def topk_share(values: Sequence[float] | np.ndarray, k: int = 3) -> float | None:
    """Fraction of the total held by the k largest blocks."""
    x = _as_array(values)
    total = x.sum()
    if x.size == 0 or total <= 0:
        return None
    return float(np.sort(x)[::-1][:k].sum() / total)


def localization(values: Sequence[float] | np.ndarray, k: int = 3) -> dict[str, float | None]:
    return {"gini": gini(values), "entropy": normalized_entropy(values), f"top{k}": topk_share(values, k)}


def block_localization(
    changed: Sequence[float], abs_sum: Sequence[float], sizes: Sequence[float], k: int = 3
) -> dict[str, dict[str, float | None]]:
    """Localization of the changed count and of Σ|Δ| across blocks, raw and per weight of the block."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    changed_arr = np.asarray(changed, dtype=np.float64)
    abs_arr = np.asarray(abs_sum, dtype=np.float64)
    safe = np.where(sizes_arr > 0, sizes_arr, 1.0)
    return {
        "count": localization(changed_arr, k),
        "count_per_weight": localization(changed_arr / safe, k),
        "abs_delta": localization(abs_arr, k),
        "abs_delta_per_weight": localization(abs_arr / safe, k),
    }


RANK_TOLERANCE_DOC = "σ_i > σ_max · max(m, n) · eps(float32), numpy's matrix_rank default"
RANK_ENERGY = 0.99
PLAN_RANK_RATIO = 0.01
RANK_DEFINITIONS = {
    "numerical": RANK_TOLERANCE_DOC,
    "energy99": f"the fewest σ_i whose squares hold {RANK_ENERGY:.0%} of Σσ²",
    "plan": f"σ_i > {PLAN_RANK_RATIO} · σ_1 (the research plan's definition)",
}


class UpdateRanks(NamedTuple):
    """Ranks of one 2-D update under the three definitions of RANK_DEFINITIONS, and its full rank min(m, n)."""

    numerical: int
    full: int
    energy99: int
    plan: int


def energy_rank(sigma: torch.Tensor, energy: float = RANK_ENERGY) -> int:
    """The fewest leading singular values (sorted descending) whose squares hold `energy` of Σσ²; 0 for none."""
    sq = sigma.double().square()
    total = float(sq.sum())
    if total <= 0:
        return 0
    return min(int((sq.cumsum(0) / total < energy).sum()) + 1, sigma.numel())


def relative_rank(sigma: torch.Tensor, ratio: float = PLAN_RANK_RATIO) -> int:
    """Singular values above `ratio` times the largest (the plan's σ > 0.01·σ₁); 0 for a zero matrix."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    return int((sigma > ratio * top).sum()) if top > 0 else 0


def update_rank(delta: torch.Tensor, device: str = "cpu") -> UpdateRanks:
    """Ranks of a 2-D update under the numerical tolerance (RANK_TOLERANCE_DOC), 99% energy and the plan's
    σ > 0.01·σ₁, with its full rank min(m, n); NaN and inf entries count as 0."""
    if delta.dim() != 2:
        raise ValueError("update_rank needs a 2-D matrix")
    m, n = delta.shape
    full = min(m, n)
    if full == 0:
        return UpdateRanks(0, 0, 0, 0)
    d = delta.to(device=device, dtype=torch.float32)
    if not torch.isfinite(d).all():
        d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
    sigma = torch.linalg.svdvals(d).cpu()
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return UpdateRanks(0, full, 0, 0)
    tol = float(sigma[0]) * max(m, n) * torch.finfo(torch.float32).eps
    return UpdateRanks(int((sigma > tol).sum()), full, energy_rank(sigma), relative_rank(sigma))


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalized singular values (Roy & Vetterli, 2007):
    n for an n×n identity, 1 for a rank-one matrix, 0 for a zero matrix."""
    sigma = torch.linalg.svdvals(matrix.detach().float())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def overlap(n1: int, n2: int, n12: int, numel: int) -> dict[str, float | None]:
    """Overlap of two subnetworks I1, I2 of one parameter space, with the chance baselines.

    o1 = |I1∩I2|/|I1|, whose expectation for independent uniform subnetworks is the density of
    run 2; o2 = |I1∩I2|/|I2|, expected density of run 1; Jaccard, expected p1·p2/(p1+p2−p1·p2).
    """
    p1 = n1 / numel if numel else 0.0
    p2 = n2 / numel if numel else 0.0
    union = n1 + n2 - n12
    expected_union = p1 + p2 - p1 * p2
    return {
        "o1": n12 / n1 if n1 else None,
        "o2": n12 / n2 if n2 else None,
        "jaccard": n12 / union if union else None,
        "o1_random": p2,
        "o2_random": p1,
        "jaccard_random": (p1 * p2 / expected_union) if expected_union > 0 else None,
        "density_1": p1,
        "density_2": p2,
    }


def shell_edges(num_neurons: int, boundaries: Sequence[int]) -> list[int]:
    """Neuron boundaries of nested shells for a matrix of `num_neurons` neurons.

    `boundaries` are given for the full model (default 8192, 16384: E2B's FFN is the first 8192
    neurons of E4B's 16384); a matrix of another width is scaled in proportion.
    """
    full = boundaries[-1]
    edges = [0]
    for b in boundaries:
        edge = round(b * num_neurons / full)
        if edge > edges[-1]:
            edges.append(edge)
    edges[-1] = num_neurons
    return edges


def shell_density(neuron_changed: np.ndarray, weights_per_neuron: int, edges: Sequence[int]) -> list[dict[str, float]]:
    """Changed density per nested shell of FFN neurons against the uniform expectation."""
    counts = np.asarray(neuron_changed, dtype=np.float64)
    total_weights = counts.size * weights_per_neuron
    overall = counts.sum() / total_weights if total_weights else 0.0
    rows = []
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        size = (hi - lo) * weights_per_neuron
        changed = counts[lo:hi].sum()
        density = changed / size if size else 0.0
        rows.append({
            "shell": i, "neuron_start": lo, "neuron_end": hi, "weights": size, "changed": changed,
            "density": density, "expected_uniform": overall,
            "ratio_to_uniform": (density / overall) if overall > 0 else None,
        })
    return rows
