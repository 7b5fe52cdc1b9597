"""The three rules of "changed" on planted deltas, and the chunked kernel against float64 numpy."""
import math
import sys

import numpy as np
import pytest
import torch

from subnetscope import changes
from subnetscope.changes import ChangeRules, changed_masks, diff_stats
from subnetscope.errors import SubnetscopeError

from .conftest import DEVICES


def test_three_rules_on_hand_built_values():
    a = torch.tensor([1.0, 1.0, 100.0, 100.0, 0.001, 5.0], dtype=torch.float32)
    b = torch.tensor([1.0, 1.0 + 2e-5, 100.0 + 2e-5, 100.5, 0.001 + 2e-6, -5.0], dtype=torch.float32)
    m = changed_masks(a, b, ChangeRules(atol=1e-5, eta=1e-3))
    # index 1: small update on a weight of 1 passes atol but not eta·1 = 1e-3
    # index 2: +2e-5 on 100 is not even representable in fp32 (ulp 7.6e-6 rounds it to 100.0000153)
    assert m["exact"].tolist() == [False, True, True, True, True, True]
    assert m["atol"].tolist() == [False, True, True, True, False, True]
    assert m["relative"].tolist() == [False, False, False, True, True, True]


def test_exact_rule_is_bitwise_in_bf16():
    a = torch.tensor([1.0, 2.0, 0.0], dtype=torch.bfloat16)
    b = a.clone()
    b[0] = torch.nextafter(a[0].float(), torch.tensor(2.0)).to(torch.bfloat16)  # rounds back: unchanged
    b[1] = a[1] + 0.0078125 * 2  # one bf16 ulp at 2.0
    b[2] = -0.0  # a sign-bit flip is a stored change
    assert changed_masks(a, b, ChangeRules())["exact"].tolist() == [False, True, True]


def test_nan_counts_as_changed_under_every_rule():
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([float("nan"), 2.0])
    m = changed_masks(a, b, ChangeRules())
    assert [m[r].tolist() for r in changes.RULES] == [[True, False]] * 3


def test_dtype_mismatch_is_compared_in_the_wider_dtype():
    a = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 3.001], dtype=torch.float32)
    assert changed_masks(a, b, ChangeRules())["exact"].tolist() == [False, True]


def reference_stats(a: np.ndarray, b: np.ndarray, atol: float, eta: float) -> dict:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(b64 - a64)
    diff = a != b
    return {
        "exact": int(diff.sum()), "atol": int((diff & (d > atol)).sum()),
        "relative": int((diff & (d > eta * np.maximum(np.abs(a64), np.abs(b64)))).sum()),
        "max": d.max(), "mean": d.mean(), "std": d.std(), "rel_norm": np.linalg.norm(d) / np.linalg.norm(a64),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(300, 70), (5000,), (3, 4, 50)])
def test_kernel_matches_numpy(shape, device):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen)
    keep = torch.rand(shape, generator=gen) < 0.8
    b = torch.where(keep, a,
                    a + torch.randn(shape, generator=gen) * 10 ** torch.empty(shape).uniform_(-7, -1, generator=gen))
    rules = ChangeRules(atol=1e-5, eta=1e-3)
    got = diff_stats(a, b, rules, per_row_col=len(shape) == 2, device=device)
    ref = reference_stats(a.numpy(), b.numpy(), 1e-5, 1e-3)
    assert got.changed == {r: ref[r] for r in changes.RULES}
    assert got.abs_max == pytest.approx(ref["max"], rel=1e-6)
    assert got.abs_mean == pytest.approx(ref["mean"], rel=1e-6)
    assert got.abs_std == pytest.approx(ref["std"], rel=1e-5)
    assert got.relative_norm == pytest.approx(ref["rel_norm"], rel=1e-6)
    if len(shape) == 2:
        mask = changed_masks(a, b, rules)
        for r in changes.RULES:
            assert torch.equal(got.row_changed[r], mask[r].sum(1))
            assert torch.equal(got.col_changed[r], mask[r].sum(0))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_counts_nonfinite_and_keeps_stats_finite(device):
    a = torch.tensor([1.0, 2.0, float("inf"), 4.0, float("nan")])
    b = torch.tensor([1.0, float("nan"), float("inf"), 4.5, 3.0])
    got = diff_stats(a, b, ChangeRules(), device=device)
    assert got.nonfinite_base == 2 and got.nonfinite_tuned == 2
    assert got.changed["exact"] == 3
    assert got.abs_max == pytest.approx(0.5)
    assert got.finite_count == 3  # unchanged entries have Δ = 0, even the inf; NaN Δ at indices 1 and 4
    assert got.abs_mean == pytest.approx(0.5 / 3)
    assert got.relative_norm == pytest.approx(0.5 / math.sqrt(1 + 4 + 16))


def test_rules_never_modify_their_inputs():
    a = torch.tensor([-1.0, 2.0, -3.0])
    b = torch.tensor([-1.5, 2.0, -3.0])
    a0, b0 = a.clone(), b.clone()
    changed_masks(a, b, ChangeRules())
    diff_stats(a, b, ChangeRules())
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_squared_norm_of_a_large_bf16_matrix_is_exact_to_float64():
    """Σw² of 4M bf16 weights against numpy's float64 sum (a float32 accumulator was 2e-5 off)."""
    x = (torch.randn(1024 * 4096, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    want = float(np.square(x.float().numpy().astype(np.float64)).sum())
    assert float(changes.squared_norm(x, torch.float32)) == pytest.approx(want, rel=1e-12)


# the repro of issue 14: 0 → NaN, 0 → +inf, 0 → -inf, 1 → 1.5 and an unchanged 2
REPRO_BASE = [0.0, 0.0, 0.0, 1.0, 2.0]
REPRO_TUNED = [float("nan"), float("inf"), float("-inf"), 1.5, 2.0]

# stored bit patterns per dtype: +inf, -inf, NaN, NaN with another payload, -NaN
SPECIAL_BITS = {
    torch.float16: (np.uint16, [0x7C00, 0xFC00, 0x7E00, 0x7E01, 0xFE00]),
    torch.bfloat16: (np.uint16, [0x7F80, 0xFF80, 0x7FC0, 0x7FC1, 0xFFC0]),
    torch.float32: (np.uint32, [0x7F800000, 0xFF800000, 0x7FC00000, 0x7FC00001, 0xFFC00000]),
    torch.float64: (np.uint64, [0x7FF0 << 48, 0xFFF0 << 48, 0x7FF8 << 48, (0x7FF8 << 48) + 1, 0xFFF8 << 48]),
}
_SIGNED = {np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """+inf, -inf and three distinct NaNs of `dtype`, built from their bits."""
    unsigned, bits = SPECIAL_BITS[dtype]
    return torch.from_numpy(np.array(bits, dtype=unsigned).view(_SIGNED[unsigned])).view(dtype)


def planted_pair(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights and a tuned copy: updates from 1e-7 to 10 of the weight's scale, some -0.0 for 0.0,
    and NaN/±inf planted on either side, on both sides alike, and on both sides differently."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    scale = 10 ** torch.empty(n, dtype=torch.float64).uniform_(-7, 1, generator=gen)
    step = scale * torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.where(torch.rand(n, generator=gen) < 0.7, a + step, a)
    zeros = torch.rand(n, generator=gen) < 0.02
    a, b = torch.where(zeros, 0.0, a).to(dtype), torch.where(zeros, -0.0, b).to(dtype)
    specials = special_values(dtype)
    picks = [specials[torch.randint(len(specials), (n,), generator=gen)] for _ in range(3)]
    where = torch.rand(n, generator=gen)
    a = torch.where(where < 0.05, picks[0], a)  # NaN/inf in the base only (or also in b below)
    b = torch.where((where >= 0.05) & (where < 0.10), picks[1], b)  # in the tuned model only
    b = torch.where(where < 0.03, picks[2], b)  # on both sides, the same or different bits
    same = (where >= 0.10) & (where < 0.13)
    a = torch.where(same, specials[2], a)  # the same NaN or inf on both sides: unchanged
    b = torch.where(same, specials[2], b)
    return a.view(shape), b.view(shape)


def numpy_rules(a: torch.Tensor, b: torch.Tensor, atol: float, eta: float) -> dict[str, np.ndarray]:
    """The rules as decided in issue 14, in float64 numpy: exact = the bits differ; atol and relative
    apply their threshold when both sides are finite, and are `exact` where either side is not."""
    view = _INT_VIEW[a.dtype.itemsize]
    differ = a.reshape(-1).view(view).numpy() != b.reshape(-1).view(view).numpy()
    a64, b64 = a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy()
    finite = np.isfinite(a64) & np.isfinite(b64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(b64 - a64)
        big = eta * np.maximum(np.abs(a64), np.abs(b64))
        return {"exact": differ, "atol": differ & np.where(finite, d > atol, True),
                "relative": differ & np.where(finite, d > big, True)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_repro_is_changed_under_every_rule(dtype, device):
    a, b = torch.tensor(REPRO_BASE, dtype=dtype), torch.tensor(REPRO_TUNED, dtype=dtype)
    masks = changed_masks(a.to(device), b.to(device), ChangeRules())
    assert {r: masks[r].tolist() for r in changes.RULES} == {r: [True] * 4 + [False] for r in changes.RULES}
    stats = diff_stats(a, b, ChangeRules(), device=device)
    assert stats.changed == {"exact": 4, "atol": 4, "relative": 4}


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_cases_one_by_one(device):
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([inf, inf, -inf, nan, inf, nan, 5.0, 3e38, 0.0], dtype=torch.float32)
    b = torch.tensor([-inf, 1.0, -inf, 7.0, nan, 0.0, 5.0, -3e38, -0.0], dtype=torch.float32)
    b[5] = special_values(torch.float32)[3]  # a NaN of another payload than a's
    want_changed = [True, True, False, True, True, True, False, True, True]
    masks = changed_masks(a.to(device), b.to(device), ChangeRules())
    assert masks["exact"].tolist() == want_changed
    # |Δ| = 6e38 overflows float32 but is a change of both rules; -0.0 for 0.0 is a change of bits only
    assert masks["atol"].tolist() == masks["relative"].tolist() == want_changed[:-1] + [False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rules_with_planted_nonfinite_match_numpy(dtype, device):
    rules = ChangeRules(atol=1e-5, eta=1e-3)
    for seed, shape in enumerate([(64, 50), (3000,)]):
        a, b = planted_pair(shape, dtype, seed)
        want = numpy_rules(a, b, rules.atol, rules.eta)
        assert all(want[r].sum() > 0 for r in changes.RULES) and want["exact"].sum() > want["relative"].sum()
        masks = changed_masks(a.to(device), b.to(device), rules)
        for r in changes.RULES:
            assert np.array_equal(masks[r].cpu().reshape(-1).numpy(), want[r]), (dtype, shape, r)
        stats = diff_stats(a, b, rules, per_row_col=len(shape) == 2, device=device)
        assert stats.changed == {r: int(want[r].sum()) for r in changes.RULES}
        if len(shape) == 2:
            for r in changes.RULES:
                assert stats.row_changed[r].tolist() == want[r].reshape(shape).sum(1).tolist()
                assert stats.col_changed[r].tolist() == want[r].reshape(shape).sum(0).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_relative_norm_hand_values(device):
    def rel(a, b):
        return diff_stats(torch.tensor(a), torch.tensor(b), ChangeRules(), device=device).relative_norm

    assert rel([0.0, 0.0], [3.0, 4.0]) == math.inf  # a change from an all-zero tensor
    assert rel([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert rel([0.0, 0.0], [0.0, -0.0]) == 0.0  # bits differ, Δ is zero
    assert rel([0.0, 0.0], [float("nan"), 0.0]) == 0.0  # over finite entries only
    assert rel([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert rel([3.0, 4.0], [3.0, 5.0]) == pytest.approx(0.2)  # ‖(0, 1)‖ / ‖(3, 4)‖
    assert changes.DiffStats(numel=2, abs_sq_sum=25.0, base_sq_sum=0.0).relative_norm == math.inf
    assert changes.DiffStats(numel=2, abs_sq_sum=0.0, base_sq_sum=0.0).relative_norm == 0.0


@pytest.mark.parametrize("flag,kwargs", [
    ("--atol", {"atol": float("nan")}), ("--atol", {"atol": -1.0}), ("--atol", {"atol": float("inf")}),
    ("--eta", {"eta": float("nan")}), ("--eta", {"eta": -1.0}), ("--eta", {"eta": float("inf")}),
    ("--eta", {"eta": "0.1"}),
])
def test_change_rules_refuse_bad_thresholds(flag, kwargs):
    with pytest.raises(SubnetscopeError, match=f"^{flag} must be a finite number >= 0"):
        ChangeRules(**kwargs)


def test_change_rules_take_zero_and_small_thresholds():
    assert (ChangeRules(0, 0).atol, ChangeRules(0, 0).eta) == (0, 0)
    assert ChangeRules(atol=1e-5, eta=1e-5) == ChangeRules(1e-5, 1e-5)
    zero = changed_masks(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0 + 2**-20]), ChangeRules(0, 0))
    assert [zero[r].tolist() for r in changes.RULES] == [[False, True]] * 3  # 0 makes both rules `exact`


# ---- the fast paths against the reference definition (changes.reference_masks / reference_stats) ----

SUBNORMAL_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}  # mantissa bits


def edge_pair(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`planted_pair` (NaN/±inf on either or both sides, ±0) plus subnormals on both sides (the same,
    moved, or a normal weight becoming one) and pairs of huge opposite values, whose |Δ| overflows
    the compute dtype in float32, bf16 and float64."""
    a, b = (x.reshape(-1).clone() for x in planted_pair(shape, dtype, seed))
    gen = torch.Generator().manual_seed(seed + 100)
    n, mant = a.numel(), SUBNORMAL_BITS[dtype]
    view = _INT_VIEW[dtype.itemsize]

    def subnormals() -> torch.Tensor:
        bits = torch.randint(1, 2**mant, (n,), generator=gen, dtype=torch.int64)
        sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) << (8 * dtype.itemsize - 1)
        return (bits | sign).to(view).view(dtype) if dtype != torch.float64 else (bits | sign).view(dtype)

    where = torch.rand(n, generator=gen)
    first, second = subnormals(), subnormals()
    a = torch.where(where < 0.05, first, a)
    b = torch.where(where < 0.03, second, torch.where(where < 0.05, first, b))  # moved or kept subnormals
    b = torch.where((where >= 0.05) & (where < 0.07), second, b)  # a weight becoming subnormal
    huge = torch.finfo(dtype).max * 0.9
    a = torch.where((where >= 0.07) & (where < 0.08), torch.tensor(huge, dtype=dtype), a)
    b = torch.where((where >= 0.07) & (where < 0.08), torch.tensor(-huge, dtype=dtype), b)
    return a.view(shape), b.view(shape)


EDGE_RULES = [ChangeRules(), ChangeRules(0, 0), ChangeRules(atol=1e-2, eta=10.0)]  # η·huge overflows to inf


def assert_stats_equal(got: changes.DiffStats, want: changes.DiffStats) -> None:
    """Counts and |Δ| maxima identical, float64 sums equal up to the order they were added in."""
    assert got.changed == want.changed
    assert (got.numel, got.nonfinite_base, got.nonfinite_tuned, got.finite_count, got.abs_max) == \
           (want.numel, want.nonfinite_base, want.nonfinite_tuned, want.finite_count, want.abs_max)
    for name in ("abs_sum", "abs_sq_sum", "base_sq_sum"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-10, abs=1e-300), name
    for along in ("row_changed", "col_changed"):
        g, w = getattr(got, along), getattr(want, along)
        assert (g is None) == (w is None)
        if w is not None:
            assert {r: g[r].tolist() for r in changes.RULES} == {r: w[r].tolist() for r in changes.RULES}


def test_reference_agrees_with_numpy_and_hand_values():
    """The reference itself, against the independent float64 numpy rules and the overflow case."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        a, b = planted_pair((40, 30), dtype, seed=5)
        want = numpy_rules(a, b, 1e-5, 1e-3)
        got = changes.reference_masks(a, b, ChangeRules())
        assert {r: got[r].reshape(-1).tolist() for r in changes.RULES} == {r: want[r].tolist() for r in changes.RULES}
    # |Δ| = 6e38 overflows float32 while η·max(|w|,|w'|) = inf: still changed; -0.0 for 0.0: bits only
    a, b = torch.tensor([3e38, 0.0, 1.0]), torch.tensor([-3e38, -0.0, 1.0])
    got = changes.reference_masks(a, b, ChangeRules(atol=1e-2, eta=10.0))
    assert {r: m.tolist() for r, m in got.items()} == {"exact": [True, True, False], "atol": [True, False, False],
                                                         "relative": [True, False, False]}


@pytest.mark.parametrize("rules", EDGE_RULES, ids=["default", "zero", "big_eta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fast_paths_equal_the_reference(dtype, rules):
    """changed_masks and diff_stats (per-row/column counts included) give exactly the reference's
    masks and counts on NaN/±inf, ±0, subnormals and overflowing |Δ|, for contiguous tensors and views."""
    a, b = edge_pair((64, 50), dtype, seed=1)
    want = changes.reference_masks(a, b, rules)
    assert all(want["exact"].sum() > want[r].sum() > 0 for r in changes.RULES[1:])  # the data tells rules apart
    for x, y in [(a, b), (a.t(), b.t()), (a[::3, 1:], b[::3, 1:]), (a.reshape(-1)[7:], b.reshape(-1)[7:])]:
        masks = changed_masks(x, y, rules)
        reference = changes.reference_masks(x, y, rules)
        assert {r: masks[r].tolist() for r in changes.RULES} == {r: reference[r].tolist() for r in changes.RULES}
        assert_stats_equal(diff_stats(x, y, rules, per_row_col=x.dim() == 2),
                           changes.reference_stats(x.contiguous(), y.contiguous(), rules, per_row_col=x.dim() == 2))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float64)])
def test_fast_paths_equal_the_reference_across_dtypes(dtypes):
    a, b = edge_pair((30, 20), torch.float16, seed=2)
    a, b = a.to(dtypes[0]), b.to(dtypes[1])
    for rules in EDGE_RULES:
        masks, reference = changed_masks(a, b, rules), changes.reference_masks(a, b, rules)
        assert {r: masks[r].tolist() for r in changes.RULES} == {r: reference[r].tolist() for r in changes.RULES}
        assert_stats_equal(diff_stats(a, b, rules, per_row_col=True), changes.reference_stats(a, b, rules, True))


def test_fast_rules_are_the_reference_rules():
    """Every fast expression stands for a rule of the reference that has a threshold, and every
    count the fast paths report is keyed by the reference's RULES, in its order."""
    assert changes.RULES == tuple(changes.TOLERANCE)
    assert set(changes.FAST_WITHIN) <= set(changes.thresholded_rules())
    assert changes.thresholded_rules() == [r for r in changes.RULES if changes.TOLERANCE[r] is not None]
    a, b = edge_pair((8, 6), torch.bfloat16, seed=3)
    stats = diff_stats(a, b, ChangeRules(), per_row_col=True)
    assert list(stats.changed) == list(stats.row_changed) == list(stats.col_changed) == list(changes.RULES)


def add_rule(monkeypatch: pytest.MonkeyPatch, name: str, tolerance) -> None:
    """Add a rule as a researcher would, with one line in changes.TOLERANCE: every subnetscope module
    that imported RULES sees the longer tuple, as it would after that edit."""
    table = {**changes.TOLERANCE, name: tolerance}
    for module in [m for key, m in sys.modules.items() if key.startswith("subnetscope")]:
        if getattr(module, "RULES", None) is changes.RULES and module is not changes:
            monkeypatch.setattr(module, "RULES", tuple(table))
    monkeypatch.setattr(changes, "RULES", tuple(table))
    monkeypatch.setattr(changes, "TOLERANCE", table)


def loose(w: torch.Tensor, w2: torch.Tensor, rules: ChangeRules) -> float:
    """A test-only fourth rule: |Δ| > 100·atol (so numpy_rules' atol rule at 100·atol is its answer)."""
    return 100 * rules.atol


def test_a_new_rule_is_one_edit(monkeypatch):
    """A rule added only to TOLERANCE is counted by changed_masks and diff_stats, per row and column
    too (the packed rule code grows with it), equal to the reference and to numpy."""
    add_rule(monkeypatch, "loose", loose)
    rules = ChangeRules(atol=1e-4, eta=1e-3)
    a, b = planted_pair((40, 30), torch.bfloat16, seed=4)
    want = numpy_rules(a, b, 100 * rules.atol, rules.eta)["atol"].reshape(40, 30)
    assert 0 < want.sum() < numpy_rules(a, b, rules.atol, rules.eta)["atol"].sum()  # differs from every other rule
    masks = changed_masks(a, b, rules)
    assert list(masks) == ["exact", "atol", "relative", "loose"]
    assert masks["loose"].tolist() == want.tolist()
    stats = diff_stats(a, b, rules, per_row_col=True)
    assert_stats_equal(stats, changes.reference_stats(a, b, rules, per_row_col=True))
    assert stats.changed["loose"] == int(want.sum())
    assert stats.row_changed["loose"].tolist() == want.sum(1).tolist()
    assert stats.col_changed["loose"].tolist() == want.sum(0).tolist()
