"""Gradient rank (experiment 1C): how many directions do k per-batch gradients span?

For each parameter matrix p, the k gradients g_1..g_k (one per batch) form a k × numel(p) matrix
M_p; its singular values are the square roots of the eigenvalues of the k × k Gram matrix
M_p M_pᵀ, and the whole model's are those of Σ_p M_p M_pᵀ. Only the gradients (on `device`, one
copy per batch: k × parameters × 4 bytes) and k × k Gram matrices are held; nothing of size
k × parameters goes to the host.

Reported per matrix and globally: the numerical rank (σ_i > σ_max · k · eps_fp32), the
effective rank at 99% energy (the fewest σ whose squares hold 99% of Σσ²) and the research plan's
rank (σ_i > 0.01 · σ_1, metrics.relative_rank), as % of k.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .metrics import relative_rank

ENERGY = 0.99


@dataclass
class Spectrum:
    name: str
    singular_values: list[float]
    numerical_rank: int
    effective_rank: int
    plan_rank: int
    k: int


def spectrum_from_gram(name: str, gram: torch.Tensor) -> Spectrum:
    """Singular values of the stacked gradients from their Gram matrix, and their three ranks."""
    eig = torch.linalg.eigvalsh(gram.double()).flip(0).clamp(min=0)
    sigma = eig.sqrt()
    k = gram.shape[0]
    smax = float(sigma[0]) if sigma.numel() else 0.0
    numerical = int((sigma > smax * k * torch.finfo(torch.float32).eps).sum()) if smax > 0 else 0
    energy = eig.cumsum(0) / eig.sum() if float(eig.sum()) > 0 else torch.ones_like(eig)
    effective = int((energy < ENERGY).sum()) + 1 if float(eig.sum()) > 0 else 0
    return Spectrum(name, sigma.tolist(), numerical, min(effective, k), relative_rank(sigma), k)


def gradient_spectra(model: torch.nn.Module, loss_for_batch: Callable[[int], torch.Tensor], k: int,
                     device: str | torch.device = "cpu") -> tuple[Spectrum, list[Spectrum]]:
    """Global and per-matrix spectra of the k per-batch gradients of `loss_for_batch(i)`, i < k."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2}
    stacks: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(k):
        model.zero_grad(set_to_none=True)
        loss_for_batch(i).backward()
        for n, p in params.items():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            stacks[n].append(grad.detach().reshape(-1).to(device=device, dtype=torch.float32))
    model.zero_grad(set_to_none=True)
    total = torch.zeros(k, k, dtype=torch.float64, device=device)
    per_matrix = []
    for n, rows in stacks.items():
        m = torch.stack(rows)
        gram = m.double() @ m.double().T  # float64: the Gram must not square float32 rounding into the spectrum
        total += gram
        per_matrix.append(spectrum_from_gram(n, gram))
        stacks[n] = []
    return spectrum_from_gram("global", total), per_matrix
