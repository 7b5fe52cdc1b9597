"""The one definition of "changed", shared by the tracker, the trainers and the analysis.

Read `TOLERANCE`, `reference_masks` and `reference_stats` first: they are the definition, written to
be checked in a minute. Everything after them is a fast path (a bitwise pass over the changed entries
only, packed counts, kernels a GPU has loaded already), each tested against the reference
(tests/test_changes.py, test_segments.py, test_tracker.py).

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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import SubnetscopeError

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


Tolerance = Callable[[torch.Tensor, torch.Tensor, ChangeRules], "torch.Tensor | float"]

# THE RULES. Under each, a weight w → w' is changed when its stored bits differ and |Δ| = |w' - w| is not
# a finite number <= the rule's tolerance (None: no tolerance, every change of bits counts). |Δ| is NaN
# or inf when a side is NaN or ±inf or a finite difference overflows: such a weight is changed under
# every rule iff its bits differ. A new rule is one line here (and a ChangeRules field if it needs a
# new threshold): every count, table and fast path iterates RULES, and the tests check them all.
TOLERANCE: dict[str, Tolerance | None] = {
    "exact": None,
    "atol": lambda w, w2, rules: rules.atol,
    "relative": lambda w, w2, rules: rules.eta * torch.maximum(w.abs(), w2.abs()),
}
RULES = tuple(TOLERANCE)


def wider_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both sides are compared in when they differ (float32 for bf16 against fp16)."""
    if a == b:
        return a
    if a.itemsize != b.itemsize:
        return a if a.itemsize > b.itemsize else b
    return torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where |Δ| and the thresholds are computed: float64 for float64, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_bits(x: torch.Tensor) -> torch.Tensor:
    """x's stored bits, as integers of its size: copied or compared through this view, every bit
    survives (a CUDA foreach copy of 16-bit floats goes through float32 and makes each NaN 0x7FFF)."""
    return x.view(_INT_VIEW[x.dtype.itemsize])


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise "the stored bits differ"; both tensors must share a dtype."""
    return as_bits(a) != as_bits(b)


@dataclass
class DiffStats:
    """Everything the analysis reports about one tensor pair."""

    numel: int
    changed: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})  # changed weights per rule
    nonfinite_base: int = 0  # NaN or ±inf weights in the base
    nonfinite_tuned: int = 0  # ... in the tuned tensor
    abs_max: float = 0.0  # max |Δ| over the finite |Δ| (an unchanged weight has Δ = 0, even a NaN or inf one)
    abs_sum: float = 0.0  # Σ|Δ| over the finite |Δ|, in float64
    abs_sq_sum: float = 0.0  # Σ|Δ|² over the finite |Δ|, in float64
    base_sq_sum: float = 0.0  # Σw² over the base's finite weights, in float64
    finite_count: int = 0  # weights whose |Δ| is finite
    row_changed: dict[str, torch.Tensor] | None = None  # per rule, changed weights per row (2-D, when asked)
    col_changed: dict[str, torch.Tensor] | None = None  # ... per column

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


def reference_masks(a: torch.Tensor, b: torch.Tensor, rules: ChangeRules) -> dict[str, torch.Tensor]:
    """THE DEFINITION: per rule, which weights of base `a` and tuned `b` (same shape) changed.
    Plain and unhurried on purpose; `changed_masks`, `diff_stats`, the batched pass and the tracker
    are tested against it."""
    common = wider_dtype(a.dtype, b.dtype)
    a, b = a.to(common), b.to(common)
    differ = bits_differ(a, b)
    w, w2 = a.to(compute_dtype(common)), b.to(compute_dtype(common))
    absd = (w2 - w).abs()
    masks = {}
    for rule, tolerance in TOLERANCE.items():
        if tolerance is None:
            masks[rule] = differ
        else:
            masks[rule] = differ & ~(torch.isfinite(absd) & (absd <= tolerance(w, w2, rules)))
    return masks


def reference_stats(a: torch.Tensor, b: torch.Tensor, rules: ChangeRules, per_row_col: bool = False) -> DiffStats:
    """THE DEFINITION of every statistic of a tensor pair: counts by `reference_masks`, |Δ| where the
    bits differ (0 elsewhere, even for an unchanged NaN or inf) and over the finite |Δ|, Σw² over the
    base's finite weights; with `per_row_col`, per-row and per-column counts of a 2-D pair."""
    masks = reference_masks(a, b, rules)
    common = wider_dtype(a.dtype, b.dtype)
    a, b = a.to(common), b.to(common)
    w, w2 = a.to(compute_dtype(common)), b.to(compute_dtype(common))
    absd = torch.where(bits_differ(a, b), (w2 - w).abs(), 0)
    finite = torch.isfinite(absd)
    d = absd[finite].double()
    stats = DiffStats(
        numel=a.numel(),
        changed={rule: int(mask.sum()) for rule, mask in masks.items()},
        nonfinite_base=int((~torch.isfinite(w)).sum()),
        nonfinite_tuned=int((~torch.isfinite(w2)).sum()),
        abs_max=float(d.max()) if d.numel() else 0.0,
        abs_sum=float(d.sum()),
        abs_sq_sum=float(d.square().sum()),
        base_sq_sum=float(w[torch.isfinite(w)].double().square().sum()),
        finite_count=int(finite.sum()),
    )
    if per_row_col and a.dim() == 2:
        stats.row_changed = {rule: mask.sum(1) for rule, mask in masks.items()}
        stats.col_changed = {rule: mask.sum(0) for rule, mask in masks.items()}
    return stats


# ---- fast paths: each gives what the reference gives (tests/test_changes.py), faster ----

def thresholded_rules() -> list[str]:
    """The rules with a tolerance (all but `exact`); a rule without one is the bitwise mask itself."""
    return [r for r in RULES if TOLERANCE[r] is not None]


def negate(mask: torch.Tensor) -> torch.Tensor:
    """`~mask`, by xor: one kernel family with `&` and `|`, not another to load (a GPU loads each new
    family of kernels on its first use, 5-45 ms)."""
    return mask ^ True


def _atol_within(absd: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor, rules: ChangeRules) -> torch.Tensor:
    return absd <= rules.atol  # NaN and inf fail `<=` a finite atol by themselves


def _relative_within(absd: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor, rules: ChangeRules) -> torch.Tensor:
    # |Δ| <= η·max(|a|,|b|) is (|Δ| <= η|a|) | (|Δ| <= η|b|), rounding being monotone, and
    # `|Δ| <= finfo.max` is "|Δ| finite" (keeps inf <= η·inf from hiding a new ±inf): the compare and
    # bitwise kernels every comparison loads anyway, where `maximum` and `isfinite` would load two more
    within = (absd <= fa.abs().mul_(rules.eta)) | (absd <= fb.abs().mul_(rules.eta))
    return within & (absd <= torch.finfo(absd.dtype).max)


# Per rule, the fast "|Δ| is finite and within the tolerance", equal to the reference's
# `isfinite(|Δ|) & (|Δ| <= tolerance)` (tested); a rule without an entry runs the reference's expression.
FAST_WITHIN: dict[str, Callable[..., torch.Tensor]] = {"atol": _atol_within, "relative": _relative_within}


def apply_rules(exact: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor,
                rules: ChangeRules) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every rule's mask from the bitwise mask `exact` and both sides in the compute dtype, and |Δ|."""
    absd = (fb - fa).abs_()
    masks = {}
    for rule in RULES:
        tolerance = TOLERANCE[rule]
        if tolerance is None:
            masks[rule] = exact
            continue
        fast = FAST_WITHIN.get(rule)
        within = fast(absd, fa, fb, rules) if fast else torch.isfinite(absd) & (absd <= tolerance(fa, fb, rules))
        masks[rule] = exact & negate(within)
    return masks, absd


def changed_masks(a: torch.Tensor, b: torch.Tensor, rules: ChangeRules) -> dict[str, torch.Tensor]:
    """Boolean masks of the changed weights under each rule, for two same-shaped tensors."""
    common = wider_dtype(a.dtype, b.dtype)
    a, b = a.to(common), b.to(common)
    calc = compute_dtype(common)
    return apply_rules(bits_differ(a, b), a.to(calc), b.to(calc), rules)[0]


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
    """Per changed entry, its thresholded rules as the bits of one small integer (bit k: the k-th of
    `thresholded_rules()`; with atol and relative, atol + 2·relative), since every entry listed is
    changed under `exact`."""
    bits = [masks[r].long() * (1 << k) if k else masks[r].long() for k, r in enumerate(thresholded_rules())]
    return sum(bits[1:], start=bits[0]) if bits else torch.zeros_like(masks[RULES[0]], dtype=torch.long)


def rule_counts_along(slot: torch.Tensor, code: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Changed counts per slot (a row or column) under each rule, on the host, from the slot and
    `rule_code` of every changed entry: one scatter-add of slot·codes + code (the same kernel family as
    `gather`, which a GPU has loaded already, where `bincount` would load another)."""
    thresholded = thresholded_rules()
    codes = 1 << len(thresholded)
    table = torch.zeros(codes * length, dtype=torch.long, device=slot.device)
    table = table.scatter_add_(0, slot * codes + code, torch.ones_like(code)).view(length, codes).cpu()
    counts = {}
    for rule in RULES:
        if rule in thresholded:
            k = thresholded.index(rule)
            counts[rule] = sum(table[:, c] for c in range(codes) if c >> k & 1)
        else:
            counts[rule] = table.sum(1)
    return counts


def diff_stats(
    a: torch.Tensor, b: torch.Tensor, rules: ChangeRules, per_row_col: bool = False, device: str = "cpu"
) -> DiffStats:
    """`reference_stats`, fast: compare base `a` with tuned `b`; optional per-row/column changed counts
    of 2-D tensors.

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
    on_device = {
        **{r: masks[r].sum().double() for r in RULES},
        "nonfinite_delta": (~finite).sum().double(),
        "nonfinite_base": nonfinite_a.double(),
        "nonfinite_tuned": nonfinite_b.double(),
        "abs_max": absd.max().double() if absd.numel() else torch.zeros((), dtype=torch.float64, device=dev),
        "abs_sum": absd.sum(dtype=torch.float64),
        "abs_sq_sum": absd.double().square().sum(),
        "base_sq_sum": base_sq,
    }
    got = dict(zip(on_device, torch.stack(list(on_device.values())).cpu().tolist()))  # one host sync
    stats = DiffStats(numel=a.numel(), changed={r: int(got[r]) for r in RULES},
                      nonfinite_base=int(got["nonfinite_base"]), nonfinite_tuned=int(got["nonfinite_tuned"]),
                      abs_max=got["abs_max"], abs_sum=got["abs_sum"], abs_sq_sum=got["abs_sq_sum"],
                      base_sq_sum=got["base_sq_sum"], finite_count=a.numel() - int(got["nonfinite_delta"]))
    if per_row_col and len(shape) == 2:
        code = rule_code(masks)
        stats.row_changed = rule_counts_along(changed_idx // shape[1], code, shape[0])
        stats.col_changed = rule_counts_along(changed_idx % shape[1], code, shape[1])
    return stats
