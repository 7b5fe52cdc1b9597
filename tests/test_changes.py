"""The three rules of "changed" on planted deltas, and the chunked kernel against float64 numpy."""
import math

import numpy as np
import pytest
import torch

from subnetscope import changes
from subnetscope.changes import ChangeRules, changed_masks, diff_stats

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
    b = torch.where(keep, a, a + torch.randn(shape, generator=gen) * 10 ** torch.empty(shape).uniform_(-7, -1, generator=gen))
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
