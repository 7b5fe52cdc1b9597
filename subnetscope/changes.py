"""The one definition of "changed", shared by the tracker, the trainers and the analysis.

Three rules, reported side by side:

* ``exact``: the stored values differ bit for bit, in the checkpoint's own dtype;
* ``atol``: ``|Δ| > atol`` (the RL-sparsity paper uses 1e-5 on bf16);
* ``relative``: ``|Δ| > η·max(|w|, |w'|)``, bf16-aware: one bf16 step is 2^-8 of a weight's
  magnitude, so a fixed atol hides updates on large weights and counts every update on small ones.

A weight whose bits are equal is never changed. A weight that became NaN or inf is changed under
every rule (``~(|Δ| <= threshold)`` is true for NaN).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

RULES = ("exact", "atol", "relative")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CPU_CHUNK = 1 << 18


@dataclass(frozen=True)
class ChangeRules:
    atol: float = 1e-5
    eta: float = 1e-3


def wider_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both sides are compared in when they differ (float32 for bf16 against fp16)."""
    if a == b:
        return a
    if a.itemsize != b.itemsize:
        return a if a.itemsize > b.itemsize else b
    return torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise "the stored bits differ"; both tensors must share a dtype."""
    view = _INT_VIEW[a.dtype.itemsize]
    return a.view(view) != b.view(view)


def changed_masks(a: torch.Tensor, b: torch.Tensor, rules: ChangeRules) -> dict[str, torch.Tensor]:
    """Boolean masks of the changed weights under each rule, for two same-shaped tensors."""
    common = wider_dtype(a.dtype, b.dtype)
    a, b = a.to(common), b.to(common)
    exact = bits_differ(a, b)
    calc = compute_dtype(common)
    fa, fb = a.to(calc), b.to(calc)
    absd = (fb - fa).abs_()
    atol = exact & ~(absd <= rules.atol)
    scale = torch.maximum(fa.abs(), fb.abs()).mul_(rules.eta)
    relative = exact & ~(absd <= scale)
    return {"exact": exact, "atol": atol, "relative": relative}


@dataclass
class DiffStats:
    """Everything the analysis reports about one tensor pair, accumulated chunk by chunk."""

    numel: int
    changed: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})
    nonfinite_base: int = 0
    nonfinite_tuned: int = 0
    abs_max: float = 0.0
    abs_sum: float = 0.0
    abs_sq_sum: float = 0.0
    base_sq_sum: float = 0.0
    finite_count: int = 0
    row_changed: dict[str, torch.Tensor] | None = None
    col_changed: dict[str, torch.Tensor] | None = None

    @property
    def abs_mean(self) -> float:
        return self.abs_sum / self.finite_count if self.finite_count else 0.0

    @property
    def abs_std(self) -> float:
        if not self.finite_count:
            return 0.0
        var = self.abs_sq_sum / self.finite_count - self.abs_mean**2
        return max(var, 0.0) ** 0.5

    @property
    def relative_norm(self) -> float:
        """‖Δ‖ / ‖W‖ over finite entries (W = the first, base, tensor)."""
        return (self.abs_sq_sum / self.base_sq_sum) ** 0.5 if self.base_sq_sum > 0 else 0.0

    def fraction(self, rule: str) -> float:
        return self.changed[rule] / self.numel if self.numel else 0.0


def _chunk_rows(shape: tuple[int, ...], device: torch.device) -> int:
    """Rows per chunk: whole tensors on a GPU, cache-sized pieces on the CPU."""
    rows = shape[0] if shape else 1
    if device.type != "cpu":
        return max(rows, 1)
    per_row = max(1, (shape[1] if len(shape) == 2 else 1))
    return max(1, CPU_CHUNK // per_row)


def diff_stats(
    a: torch.Tensor, b: torch.Tensor, rules: ChangeRules, per_row_col: bool = False, device: str = "cpu"
) -> DiffStats:
    """Compare base `a` with tuned `b` in cache-sized chunks; optional per-row/column counts of 2-D tensors."""
    dev = torch.device(device)
    common = wider_dtype(a.dtype, b.dtype)
    calc = compute_dtype(common)
    shape = tuple(a.shape)
    two_d = len(shape) == 2
    a2 = a.reshape(shape[0], -1) if two_d else a.reshape(-1)
    b2 = b.reshape(shape[0], -1) if two_d else b.reshape(-1)
    stats = DiffStats(numel=a.numel())
    if per_row_col and two_d:
        stats.row_changed = {r: torch.zeros(shape[0], dtype=torch.int64, device=dev) for r in RULES}
        stats.col_changed = {r: torch.zeros(shape[1], dtype=torch.int64, device=dev) for r in RULES}
    step = _chunk_rows(shape if two_d else (a2.numel(),), dev)
    acc = torch.zeros(6, dtype=torch.float64, device=dev)
    counts = torch.zeros(6, dtype=torch.int64, device=dev)
    total = a2.shape[0]
    for start in range(0, total, step):
        ca = a2[start:start + step].to(dev, non_blocking=True).to(common)
        cb = b2[start:start + step].to(dev, non_blocking=True).to(common)
        exact = bits_differ(ca, cb)
        fa, fb = ca.to(calc), cb.to(calc)
        absd = (fb - fa).abs_()
        atol = exact & ~(absd <= rules.atol)
        scale = torch.maximum(fa.abs(), fb.abs()).mul_(rules.eta)
        relative = exact & ~(absd <= scale)
        finite = torch.isfinite(absd)
        finite_a, finite_b = torch.isfinite(fa), torch.isfinite(fb)
        if dev.type != "cpu" or not bool(finite.all()):
            zero = torch.zeros((), dtype=calc, device=dev)
            absd = torch.where(finite, absd, zero)
            fa = torch.where(finite_a, fa, zero)
        counts += torch.stack([
            exact.sum(), atol.sum(), relative.sum(), finite.sum(),
            (~finite_a).sum(), (~finite_b).sum(),
        ])
        acc[0] = torch.maximum(acc[0], absd.max().double()) if absd.numel() else acc[0]
        acc[1] += absd.sum(dtype=torch.float64)
        acc[2] += absd.double().square().sum() if calc == torch.float64 else absd.square().sum(dtype=torch.float64)
        acc[3] += fa.square().sum(dtype=torch.float64)
        if stats.row_changed is not None:
            for rule, mask in (("exact", exact), ("atol", atol), ("relative", relative)):
                stats.row_changed[rule][start:start + step] += mask.sum(dim=1)
                stats.col_changed[rule] += mask.sum(dim=0)
    counts_cpu = counts.cpu().tolist()
    acc_cpu = acc.cpu().tolist()
    stats.changed = dict(zip(RULES, counts_cpu[:3]))
    stats.finite_count, stats.nonfinite_base, stats.nonfinite_tuned = counts_cpu[3:6]
    stats.abs_max, stats.abs_sum, stats.abs_sq_sum, stats.base_sq_sum = acc_cpu[:4]
    if stats.row_changed is not None:
        stats.row_changed = {r: t.cpu() for r, t in stats.row_changed.items()}
        stats.col_changed = {r: t.cpu() for r, t in stats.col_changed.items()}
    return stats
