"""Every metric against a hand-computed or independently computed value."""
import itertools
import math

import numpy as np
import pytest
import torch

from subnetscope.metrics import (
    UpdateRanks,
    block_localization,
    energy_rank,
    gini,
    normalized_entropy,
    overlap,
    relative_rank,
    shell_density,
    shell_edges,
    topk_share,
    update_rank,
)
from subnetscope.stats import bootstrap_ci, more_concentrated_test


def gini_mean_difference(x):
    """Independent definition: mean absolute difference over twice the mean."""
    x = np.asarray(x, dtype=float)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean())


def test_gini_hand_values():
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)  # (-3·1 - 1·2 + 1·3 + 3·4) / (4·10)
    assert gini([0, 0, 0, 5]) == pytest.approx(0.75)  # (n-1)/n: everything in one block
    assert gini([2, 2, 2]) == pytest.approx(0.0)
    assert gini([0, 0]) is None


def test_gini_matches_mean_difference_definition():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.exponential(size=17)
        assert gini(x) == pytest.approx(gini_mean_difference(x))


def test_entropy_hand_values():
    assert normalized_entropy([1, 1]) == pytest.approx(1.0)
    assert normalized_entropy([1, 0]) == pytest.approx(0.0)
    h = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert normalized_entropy([1, 1, 2]) == pytest.approx(h / math.log(3))


def test_topk_share():
    assert topk_share([5, 1, 1, 3], k=2) == pytest.approx(0.8)
    assert topk_share([1, 1], k=3) == pytest.approx(1.0)
    assert topk_share([0, 0], k=1) is None


def test_block_localization_normalizes_by_size():
    loc = block_localization(changed=[10, 10], abs_sum=[1.0, 3.0], sizes=[10, 100], k=1)
    assert loc["count"]["gini"] == pytest.approx(0.0)
    assert loc["count_per_weight"]["top1"] == pytest.approx(1.0 / 1.1)  # 1.0 vs 0.1 per weight
    assert loc["abs_delta"]["top1"] == pytest.approx(0.75)
    assert loc["abs_delta_per_weight"]["top1"] == pytest.approx(0.1 / 0.13)


def test_update_rank_of_planted_low_rank_matrix():
    torch.manual_seed(0)
    for r in (1, 3, 7):
        delta = torch.randn(40, r) @ torch.randn(r, 30)
        ranks = update_rank(delta)
        assert (ranks.numerical, ranks.full) == (r, 30)
        assert ranks.plan <= r and ranks.energy99 <= r  # neither counts the rounding noise beyond rank r
    assert update_rank(torch.zeros(5, 4)) == (0, 4, 0, 0)
    assert update_rank(torch.randn(6, 9))[:2] == (6, 6)


def test_three_rank_definitions_by_hand():
    """σ = 10, 1, 0.05, 0.001 (an orthogonally rotated diagonal): numerically all 4 (tolerance 10·5·eps ≈ 6e-6);
    the plan's σ > 0.01·σ₁ = 0.1 keeps 2; 99% energy: 100/101.0025 = 0.990 already, so 1."""
    q1, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    sigma = torch.tensor([10.0, 1.0, 0.05, 0.001], dtype=torch.float64)
    delta = (q1[:, :4] * sigma) @ q2.T
    assert update_rank(delta) == UpdateRanks(numerical=4, full=4, energy99=1, plan=2)
    flat = torch.ones(4, dtype=torch.float64)
    assert energy_rank(flat) == 4 and relative_rank(flat) == 4  # cumulative energy 0.25, 0.5, 0.75, 1.0
    assert energy_rank(torch.tensor([4.0, 3.0, 0.0])) == 2  # 16/25, then 25/25: the second reaches 99%
    assert relative_rank(torch.tensor([1.0, 0.01, 0.0101])) == 2  # strictly above 0.01·σ₁


def test_overlap_hand_values():
    o = overlap(n1=10, n2=20, n12=5, numel=100)
    assert o["o1"] == pytest.approx(0.5) and o["o2"] == pytest.approx(0.25)
    assert o["jaccard"] == pytest.approx(5 / 25)
    assert o["o1_random"] == pytest.approx(0.2) and o["o2_random"] == pytest.approx(0.1)
    assert o["jaccard_random"] == pytest.approx(0.02 / (0.1 + 0.2 - 0.02))


def test_overlap_random_baseline_matches_simulation():
    rng = np.random.default_rng(0)
    n, p1, p2 = 200_000, 0.1, 0.3
    a, b = rng.random(n) < p1, rng.random(n) < p2
    o = overlap(int(a.sum()), int(b.sum()), int((a & b).sum()), n)
    assert o["o1"] == pytest.approx(o["o1_random"], abs=0.01)
    assert o["o2"] == pytest.approx(o["o2_random"], abs=0.01)
    assert o["jaccard"] == pytest.approx(o["jaccard_random"], abs=0.01)


def test_shell_edges_scale_to_matrix_width():
    assert shell_edges(16384, (8192, 16384)) == [0, 8192, 16384]
    assert shell_edges(64, (8192, 16384)) == [0, 32, 64]
    assert shell_edges(10, (2, 5, 10)) == [0, 2, 5, 10]


def test_shell_density_hand_values():
    counts = np.array([4, 4, 0, 0])  # changes only in the inner half; 4 weights per neuron
    rows = shell_density(counts, weights_per_neuron=4, edges=[0, 2, 4])
    assert rows[0]["density"] == pytest.approx(1.0) and rows[1]["density"] == pytest.approx(0.0)
    assert rows[0]["expected_uniform"] == pytest.approx(0.5)
    assert rows[0]["ratio_to_uniform"] == pytest.approx(2.0)


def test_bootstrap_ci_brackets_the_estimate():
    x = np.random.default_rng(1).exponential(size=24)
    low, high = bootstrap_ci(x, gini, n_resamples=500, seed=0)
    assert low < gini(x) < high


def test_permutation_test_matches_exact_enumeration():
    a, b = [9.0, 1.0, 1.0], [2.0, 3.0, 2.5]
    result = more_concentrated_test(a, b, n_resamples=10_000, seed=0)
    xa, xb = np.array(a) / np.mean(a), np.array(b) / np.mean(b)
    pooled = np.concatenate([xa, xb])
    observed = gini(xa) - gini(xb)
    hits = total = 0
    for idx in itertools.combinations(range(6), 3):
        rest = [i for i in range(6) if i not in idx]
        diff = gini(pooled[list(idx)]) - gini(pooled[rest])
        hits += diff >= observed - 1e-12
        total += 1
    assert result["statistic"] == pytest.approx(observed)
    assert result["p_value"] == pytest.approx(hits / total)
