"""The one definition of "changed", shared by the tracker, the trainers and the analysis.

Three rules, reported side by side:

* ``exact``: the stored values differ bit for bit, in the checkpoint's own dtype;
* ``atol``: ``|Δ| > atol`` (the RL-sparsity paper uses 1e-5 on bf16);
* ``relative``: ``|Δ| > η·max(|w|, |w'|)``, bf16-aware: one bf16 step is 2^-8 of a weight's
  magnitude, so a fixed atol hides updates on large weights and counts every update on small ones.

A weight whose bits are equal is never changed. ``atol`` and ``relative`` apply their threshold
only when both sides are finite; when either side is NaN or ±inf, a weight is changed iff its bits
differ, under every rule: finite → NaN/±inf, NaN/±inf → finite and +inf → -inf are changed, the
same non-finite bits on both sides are not. (Without that, ``inf <= η·inf`` would call a weight
that became inf unchanged under ``relative``.) A difference of two finite values too large for the
compute dtype (|Δ| > 3.4e38 in float32, used for every dtype but float64) counts as changed.

``relative_norm`` = ‖Δ‖/‖W‖ over the finite entries is inf when the base tensor is all zeros and
Δ is not, and 0.0 when Δ is zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import SubnetscopeError

RULES = ("exact", "atol", "relative")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class ChangeRules:
    """The thresholds of the `atol` and `relative` rules; checked where they are made, so a bad flag
    (NaN, negative) is refused before any work instead of silently turning a rule into `exact`."""

    atol: float = 1e-5  # absolute rule: changed if |Δ| > atol (the RL-sparsity paper's bf16 tolerance)
    eta: float = 1e-3  # relative rule: changed if |Δ| > eta·max(|w|, |w'|)

    def __post_init__(self) -> None:
        for flag, value in (("--atol", self.atol), ("--eta", self.eta)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SubnetscopeError(f"{flag} must be a finite number >= 0 (got {value}); 0 makes the rule `exact`")


def wider_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both sides are compared in when they differ (float32 for bf16 against fp16)."""
    if a == b:
        return a
    if a.itemsize != b.itemsize:
        return a if a.itemsize > b.itemsize else b
    return torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_bits(x: torch.Tensor) -> torch.Tensor:
    """x's stored bits, as integers of its size: copied or compared through this view, every bit
    survives (a CUDA foreach copy of 16-bit floats goes through float32 and makes each NaN 0x7FFF)."""
    return x.view(_INT_VIEW[x.dtype.itemsize])


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise "the stored bits differ"; both tensors must share a dtype."""
    return as_bits(a) != as_bits(b)


def negate(mask: torch.Tensor) -> torch.Tensor:
    """Logical not of a bool mask, by xor: one kernel family with `&` and `|`, not another to load."""
    return mask ^ True


def apply_rules(exact: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor,
                rules: ChangeRules) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The three rules' masks from the bitwise mask and both sides in the compute dtype, and |Δ|."""
    absd = (fb - fa).abs_()
    # where the bits differ, |Δ| is NaN or inf iff a side is NaN or ±inf (or a finite |Δ| overflows),
    # and `|Δ| <= atol` is false for both: changed
    atol = exact & negate(absd <= rules.atol)
    # |Δ| <= η·max(|a|,|b|) is (|Δ| <= η|a|) | (|Δ| <= η|b|), rounding being monotone: the same mask
    # with the bitwise kernels `&` needs anyway (a GPU loads each new family of kernels on first use, 5-45 ms);
    # `|Δ| <= finfo.max` (|Δ| finite, with the `<=` kernels) keeps inf <= η·inf from hiding a new ±inf
    within = (absd <= fa.abs().mul_(rules.eta)) | (absd <= fb.abs().mul_(rules.eta))
    relative = exact & negate(within & (absd <= torch.finfo(absd.dtype).max))
    return {"exact": exact, "atol": atol, "relative": relative}, absd


def changed_masks(a: torch.Tensor, b: torch.Tensor, rules: ChangeRules) -> dict[str, torch.Tensor]:
    """Boolean masks of the changed weights under each rule, for two same-shaped tensors."""
    common = wider_dtype(a.dtype, b.dtype)
    a, b = a.to(common), b.to(common)
    calc = compute_dtype(common)
    return apply_rules(bits_differ(a, b), a.to(calc), b.to(calc), rules)[0]


@dataclass
class DiffStats:
    """Everything the analysis reports about one tensor pair."""

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
        """‖Δ‖ / ‖W‖ over finite entries (W = the first, base, tensor); inf when W is zero and Δ is not
        (a change from nothing is infinitely large relative to it, not none), 0.0 when Δ is zero."""
        if self.base_sq_sum > 0:
            return (self.abs_sq_sum / self.base_sq_sum) ** 0.5
        return math.inf if self.abs_sq_sum > 0 else 0.0

    def fraction(self, rule: str) -> float:
        return self.changed[rule] / self.numel if self.numel else 0.0


def _nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).sum()


_NORM_CHUNK = 1 << 20


def changed_indices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat int64 indices where the bits of two flat same-dtype tensors differ.

    numpy's flatnonzero is about twice as fast as torch's nonzero on the CPU; on a GPU the xor of
    the bits goes to `nonzero` directly, since `!=` would load one more kernel family (20-30 ms)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(bits_differ(a, b).numpy()))
    return (as_bits(a) ^ as_bits(b)).nonzero().squeeze(1)


def _to_calc(x: torch.Tensor, calc: torch.dtype) -> torch.Tensor:
    """x in the compute dtype; bf16 → float32 on the CPU by a 16-bit shift, which is exact and
    faster than torch's conversion."""
    if x.dtype == torch.bfloat16 and calc == torch.float32 and x.device.type == "cpu":
        return torch.from_numpy((x.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32))
    return x.to(calc)


def squared_norm(x: torch.Tensor, calc: torch.dtype) -> torch.Tensor:
    """Σx² of a flat tensor, accumulated in float64 (a float32 accumulator drifts by 1e-5 over a
    4M-entry matrix); NaN or inf when x holds any. On the CPU from chunked float64 dot products
    (faster than vector_norm on bf16); on a GPU from one norm kernel, since a dot would start
    cuBLAS, whose first use costs more than the whole comparison of a small model."""
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dtype=torch.float64).square()
    parts = [torch.dot(c, c) for c in (_to_calc(x[i:i + _NORM_CHUNK], calc).double()
                                       for i in range(0, x.numel(), _NORM_CHUNK))]
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.stack(parts).sum()


def finite_squared_norm(x: torch.Tensor, calc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Σx² over the finite entries, and the count of the others."""
    finite = torch.isfinite(x)
    zero = torch.zeros((), dtype=calc, device=x.device)
    return torch.where(finite, x.to(calc), zero).double().square().sum(), (~finite).sum()


def rule_code(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per changed entry, atol + 2·relative (0-3): the three rules in one small integer, since every
    entry listed is changed under `exact`."""
    return masks["atol"].long() + 2 * masks["relative"].long()


def rule_counts_along(slot: torch.Tensor, code: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Changed counts per slot (a row or column) under each rule, on the host, from the slot and
    rule code of every changed entry: one scatter-add of slot·4 + code (the same kernel family as
    `gather`, which a GPU has loaded already, where `bincount` would load another)."""
    table = torch.zeros(4 * length, dtype=torch.long, device=slot.device)
    table = table.scatter_add_(0, slot * 4 + code, torch.ones_like(code)).view(length, 4).cpu()
    return {"exact": table.sum(1), "atol": table[:, 1] + table[:, 3], "relative": table[:, 2] + table[:, 3]}


def diff_stats(
    a: torch.Tensor, b: torch.Tensor, rules: ChangeRules, per_row_col: bool = False, device: str = "cpu"
) -> DiffStats:
    """Compare base `a` with tuned `b`; optional per-row/column changed counts of 2-D tensors.

    One bitwise pass finds the changed entries; every float operation then runs on that subset
    only, since an unchanged entry contributes exactly zero to every |Δ| statistic. ‖W‖ comes
    from one dot-product pass over `a`, whose finiteness also tells whether `a` holds NaN or inf.
    """
    dev = torch.device(device)
    common = wider_dtype(a.dtype, b.dtype)
    calc = compute_dtype(common)
    shape = tuple(a.shape)
    fa_all = a.reshape(-1).to(dev, non_blocking=a.is_pinned()).to(common)
    fb_all = b.reshape(-1).to(dev, non_blocking=b.is_pinned()).to(common)
    changed_idx = changed_indices(fa_all, fb_all)
    va, vb = fa_all.index_select(0, changed_idx).to(calc), fb_all.index_select(0, changed_idx).to(calc)
    every = torch.ones(changed_idx.shape, dtype=torch.bool, device=dev)  # the subset differs bitwise by construction
    masks, absd = apply_rules(every, va, vb, rules)
    finite = torch.isfinite(absd)
    absd = torch.where(finite, absd, torch.zeros((), dtype=calc, device=dev))
    base_sq = squared_norm(fa_all, calc)
    if not bool(torch.isfinite(base_sq)):
        base_sq, nonfinite_a = finite_squared_norm(fa_all, calc)
    else:
        nonfinite_a = torch.zeros((), dtype=torch.int64, device=dev)
    nonfinite_b = nonfinite_a - _nonfinite_count(va) + _nonfinite_count(vb)
    summary = torch.stack([
        *(masks[r].sum().double() for r in RULES), (~finite).sum().double(), nonfinite_a.double(), nonfinite_b.double(),
        absd.max().double() if absd.numel() else torch.zeros((), dtype=torch.float64, device=dev),
        absd.sum(dtype=torch.float64), absd.double().square().sum(), base_sq,
    ]).cpu().tolist()
    stats = DiffStats(numel=a.numel())
    stats.changed = {r: int(summary[i]) for i, r in enumerate(RULES)}
    stats.finite_count = stats.numel - int(summary[3])
    stats.nonfinite_base, stats.nonfinite_tuned = int(summary[4]), int(summary[5])
    stats.abs_max, stats.abs_sum, stats.abs_sq_sum, stats.base_sq_sum = summary[6:10]
    if per_row_col and len(shape) == 2:
        code = rule_code(masks)
        stats.row_changed = rule_counts_along(changed_idx // shape[1], code, shape[0])
        stats.col_changed = rule_counts_along(changed_idx % shape[1], code, shape[1])
    return stats
