"""The flat, chunked tracker against a direct per-tensor computation of the same rules."""
import numpy as np
import pytest
import torch

from subnetscope.changes import RULES, ChangeRules, as_bits, changed_masks, reference_stats
from subnetscope.errors import SubnetscopeError
from subnetscope.tracker import CHUNK, UpdateTracker, track_flat

from .conftest import DEVICES
from .test_changes import (
    EDGE_RULES,
    REPRO_BASE,
    REPRO_TUNED,
    add_rule,
    edge_pair,
    loose,
    numpy_rules,
    planted_pair,
    special_values,
)


def test_tracker_counts_equal_direct_masks_across_dtypes_and_ragged_sizes():
    gen = torch.Generator().manual_seed(0)
    params = {
        "transformer.h.0.attn.c_attn.weight": torch.randn(37, 101, generator=gen).to(torch.bfloat16),
        "transformer.h.1.mlp.c_fc.weight": torch.randn(CHUNK + 5, generator=gen).to(torch.bfloat16),
        "transformer.ln_f.weight": torch.randn(13, generator=gen),  # a float32 group of its own
        "transformer.h.1.ln_2.bias": torch.randn(CHUNK, generator=gen),
    }
    theta0 = {n: p.clone() for n, p in params.items()}
    rules = ChangeRules(atol=1e-3, eta=1e-2)
    tracker = UpdateTracker(params, rules)
    assert len(tracker.groups) == 2
    previous = {n: p.clone() for n, p in params.items()}
    first = {n: torch.full(p.shape, -1) for n, p in params.items()}
    for step in (1, 2, 3):
        for name, p in params.items():
            hit = torch.rand(p.shape, generator=gen) < 0.2
            scale = 10 ** torch.empty(p.shape).uniform_(-5, 0, generator=gen)
            p.copy_(torch.where(hit, p.float() + scale * torch.randn(p.shape, generator=gen), p.float()).to(p.dtype))
        if step == 3:  # one tensor moves back to θ0: changed vs previous, unchanged vs θ0
            params["transformer.ln_f.weight"].copy_(theta0["transformer.ln_f.weight"])
        record = tracker.update(step)
        for i, name in enumerate(record.names):
            vs0 = changed_masks(theta0[name], params[name], rules)
            vs1 = changed_masks(previous[name], params[name], rules)
            first[name] = torch.where(vs0["exact"] & (first[name] < 0), step, first[name])
            for rule in RULES:
                assert record.vs_initial[rule][i] == int(vs0[rule].sum()), (step, name, rule)
                assert record.vs_previous[rule][i] == int(vs1[rule].sum()), (step, name, rule)
            assert record.ever_changed[i] == int((first[name] >= 0).sum())
            assert torch.equal(tracker.first_changed[name].long(), first[name])
            previous[name] = params[name].clone()
    assert record.vs_initial["exact"][record.names.index("transformer.ln_f.weight")] == 0


def test_theta0_is_borrowed_not_copied():
    reference_model = torch.nn.Linear(5, 3)
    policy = torch.nn.Linear(5, 3)
    policy.load_state_dict(reference_model.state_dict())
    params = dict(policy.named_parameters())
    reference = dict(reference_model.named_parameters())
    tracker = UpdateTracker(params, initial=reference)
    group = tracker.groups[0]
    assert reference_model.weight.data_ptr() == group.initial.data_ptr()  # shares the tracker's θ0 buffer
    x = torch.randn(2, 5)
    torch.testing.assert_close(reference_model(x), policy(x))  # and still computes the same function
    with torch.no_grad():
        policy.weight[1, 3] += 1.0
    assert tracker.update(1).vs_initial["exact"] == [1, 0]


def test_state_roundtrip_restores_first_changed():
    params = {"w": torch.zeros(10)}
    tracker = UpdateTracker(params)
    params["w"][2] = 1.0
    tracker.update(1)
    params["w"][5] = 1.0
    tracker.update(2)
    state = tracker.state_dict()
    fresh = UpdateTracker({"w": torch.zeros(10)})
    fresh.params["w"].copy_(params["w"])
    fresh.load_state_dict(state)
    assert fresh.first_changed["w"].tolist() == [-1, -1, 1, -1, -1, 2, -1, -1, -1, -1]
    assert fresh.update(3).vs_previous["exact"] == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_tracker_counts_nonfinite_steps_by_hand(device):
    """The issue-14 repro and two more steps, vs θ0 and vs the previous step (the compiled step on a GPU)."""
    params = {"w": torch.tensor(REPRO_BASE, device=device)}
    tracker = UpdateTracker(params, ChangeRules())
    steps = [  # weights, then (vs θ0, vs previous) for every rule
        (REPRO_TUNED, 4, 4),  # 0 → NaN, 0 → ±inf, 1 → 1.5
        ([float("nan"), float("-inf"), float("-inf"), 1.5, 2.0], 4, 1),  # the same NaN bits; +inf → -inf
        ([1.0, float("-inf"), float("-inf"), 1.5, 2.0], 4, 1),  # NaN → 1
    ]
    for step, (weights, vs0, vs1) in enumerate(steps, start=1):
        params["w"].copy_(torch.tensor(weights))
        record = tracker.update(step)
        assert {r: record.vs_initial[r] for r in RULES} == {r: [vs0] for r in RULES}, step
        assert {r: record.vs_previous[r] for r in RULES} == {r: [vs1] for r in RULES}, step
        assert record.ever_changed == [4]


@pytest.mark.parametrize("device", DEVICES)
def test_tracker_with_planted_nonfinite_matches_numpy(device):
    rules = ChangeRules(atol=1e-5, eta=1e-3)
    trajectories = {f"transformer.h.{i}.mlp.c_fc.weight": [planted_pair((CHUNK + 7,), dtype, seed=s)
                                                             for s in range(3)]
                    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16))}
    params = {n: pairs[0][0].clone().to(device) for n, pairs in trajectories.items()}
    theta0 = {n: p.cpu().clone() for n, p in params.items()}
    tracker = UpdateTracker(params, rules)
    previous = dict(theta0)
    for step in range(3):
        for name, pairs in trajectories.items():
            params[name].copy_(pairs[step][1])  # a fresh planted tensor each step: changes vs both sides
        record = tracker.update(step + 1)
        for i, name in enumerate(record.names):
            current = params[name].cpu()
            vs0, vs1 = numpy_rules(theta0[name], current, 1e-5, 1e-3), numpy_rules(previous[name], current, 1e-5, 1e-3)
            for r in RULES:
                assert record.vs_initial[r][i] == int(vs0[r].sum()), (step, name, r)
                assert record.vs_previous[r][i] == int(vs1[r].sum()), (step, name, r)
            previous[name] = current.clone()


@pytest.mark.parametrize("atol,eta,flag", [(float("nan"), 1e-3, "--atol"), (-1.0, 1e-3, "--atol"),
                                           (1e-5, -1.0, "--eta"), (1e-5, float("inf"), "--eta")])
def test_tracker_step_refuses_bad_thresholds(atol, eta, flag):
    flat = torch.zeros(CHUNK)
    first = torch.full((CHUNK,), -1, dtype=torch.int16)
    with pytest.raises(SubnetscopeError, match=f"^{flag} must be a finite number >= 0"):
        track_flat(flat, flat.clone(), flat.clone(), first, torch.tensor(1, dtype=torch.int16), atol, eta)
    assert first.tolist() == [-1] * CHUNK  # refused before any work


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tracker_keeps_every_bit_of_a_nan(dtype, device):
    """A NaN whose payload or sign changes is a stored change (a CUDA foreach copy of 16-bit floats
    would turn every NaN into 0x7FFF, hiding it), and θ0 and the previous step keep the exact bits."""
    nans = special_values(dtype)[2:]  # NaN, NaN of another payload, -NaN
    theta0 = torch.cat([nans[:1], torch.ones(3, dtype=dtype)])
    params = {"w": theta0.clone().to(device)}
    tracker = UpdateTracker(params, ChangeRules())
    for step, nan in enumerate(nans[1:], start=1):
        params["w"][0] = nan
        record = tracker.update(step)
        assert {r: (record.vs_initial[r], record.vs_previous[r]) for r in RULES} == {r: ([1], [1]) for r in RULES}
        assert torch.equal(as_bits(tracker.previous["w"]).cpu(), as_bits(params["w"]).cpu())
    assert torch.equal(as_bits(tracker.initial["w"]).cpu(), as_bits(theta0))


def numpy_bf16_bits(x: torch.Tensor) -> np.ndarray:
    """float32 -> bfloat16 by round-to-nearest-even on the bits, in numpy (finite inputs)."""
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("device", DEVICES)
def test_view_dtype_judges_fp32_masters_as_their_bf16_rounding(device):
    gen = torch.Generator().manual_seed(3)
    params = {"h.0.mlp.c_fc.weight": torch.randn(64, 77, generator=gen).to(device),
              "h.1.ln.weight": torch.randn(CHUNK + 3, generator=gen).to(device)}
    theta0 = {n: p.clone().cpu() for n, p in params.items()}
    rules = ChangeRules(atol=1e-5, eta=1e-3)
    view = UpdateTracker(params, rules, view_dtype=torch.bfloat16)
    master = UpdateTracker(params, rules)
    for step in (1, 2):
        for p in params.values():  # Adam-sized steps: most vanish in bf16, a few cross a rounding boundary
            p.add_(1e-3 * torch.randn(p.shape, generator=gen).to(device))
        v, m = view.update(step), master.update(step)
        for i, name in enumerate(v.names):
            now = params[name].cpu()
            a = torch.from_numpy(numpy_bf16_bits(theta0[name]).view(np.int16)).view(torch.bfloat16)
            b = torch.from_numpy(numpy_bf16_bits(now).view(np.int16)).view(torch.bfloat16)
            expected = numpy_rules(a, b, rules.atol, rules.eta)
            fp32 = numpy_rules(theta0[name], now, rules.atol, rules.eta)
            for rule in RULES:
                assert v.vs_initial[rule][i] == int(expected[rule].sum()), (step, name, rule)
                assert m.vs_initial[rule][i] == int(fp32[rule].sum()), (step, name, rule)
            assert v.vs_initial["exact"][i] < m.vs_initial["exact"][i]  # rounding hides most fp32 updates
    masks = view.exact_masks()
    for name, p in params.items():
        assert torch.equal(masks[name].cpu(), changed_masks(theta0[name].to(torch.bfloat16),
                                                            p.cpu().to(torch.bfloat16), rules)["exact"])
        assert view.published(name).dtype == torch.bfloat16 and p.dtype == torch.float32


def numpy_abs_delta(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """max / mean / std (population) of |Δ| over the entries where it is finite, in float64 numpy."""
    parts = [np.abs(b.double().numpy().ravel() - a.double().numpy().ravel()) for a, b in pairs]
    d = np.concatenate(parts)
    d = d[np.isfinite(d)]
    return {"max": float(d.max()), "mean": float(d.mean()), "std": float(d.std())}


@pytest.mark.parametrize("device", DEVICES)
def test_tracker_abs_delta_per_layer_matches_numpy(device):
    """abs_delta/<layer>/max|mean|std against an independent float64 computation, over ragged tensors of two
    dtypes (one group each), two layers and `outside`, with a weight that became NaN (left out, as the analysis
    does)."""
    gen = torch.Generator().manual_seed(5)
    params = {
        "transformer.h.0.attn.c_attn.weight": torch.randn(37, 101, generator=gen).to(torch.bfloat16),
        "transformer.h.0.ln_1.weight": torch.randn(13, generator=gen),
        "transformer.h.1.mlp.c_fc.weight": torch.randn(CHUNK + 5, generator=gen),
        "transformer.wte.weight": torch.randn(50, 8, generator=gen).to(torch.bfloat16),
    }
    params = {n: p.to(device) for n, p in params.items()}
    theta0 = {n: p.cpu().clone() for n, p in params.items()}
    tracker = UpdateTracker(params, ChangeRules())
    layers = {"layer_0": ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.weight"],
              "layer_1": ["transformer.h.1.mlp.c_fc.weight"], "outside": ["transformer.wte.weight"]}
    layers["all"] = list(params)
    for step in (1, 2):
        for p in params.values():
            hit = (torch.rand(p.shape, generator=gen) < 0.3).to(device)
            step_size = 10 ** torch.empty(p.shape).uniform_(-4, -1, generator=gen) * torch.randn(p.shape, generator=gen)
            p.copy_(torch.where(hit, p.float() + step_size.to(device), p.float()).to(p.dtype))
        if step == 2:
            params["transformer.h.1.mlp.c_fc.weight"][7] = float("nan")
        record = tracker.update(step)
        metrics = tracker.metrics(record)
        for layer, names in layers.items():
            expected = numpy_abs_delta([(theta0[n], params[n].cpu()) for n in names])
            for stat, value in expected.items():
                assert metrics[f"abs_delta/{layer}/{stat}"] == pytest.approx(value, rel=1e-5), (step, layer, stat)
    assert record.nonfinite[record.names.index("transformer.h.1.mlp.c_fc.weight")] == 1
    assert metrics["abs_delta/layer_1/max"] < 1  # the NaN is not a huge change


def test_tracker_abs_delta_at_the_view_dtype():
    """Under a bf16 view the statistics are those of the bf16 roundings, not of the fp32 masters."""
    params = {"model.layers.0.mlp.up_proj.weight": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    tracker = UpdateTracker(params, view_dtype=torch.bfloat16)
    params["model.layers.0.mlp.up_proj.weight"].add_(torch.tensor([1e-4, 0.02, 0.0, 0.05]))
    metrics = tracker.metrics(tracker.update(1))
    # bf16 of 1.0001 is 1.0; 2.02 -> 2.015625 (spacing 1/64 at 2); 4.05 -> 4.0625 (spacing 1/32 at 4)
    assert metrics["abs_delta/layer_0/max"] == pytest.approx(0.0625)
    assert metrics["abs_delta/layer_0/mean"] == pytest.approx((0.015625 + 0.0625) / 4)
    assert metrics["abs_delta/all/max"] == metrics["abs_delta/layer_0/max"]
    assert "abs_delta/outside/max" not in metrics


def test_tracker_reports_each_tower_of_a_multimodal_model():
    """A vision tower's weights stay out of the text blocks and get their own changed fraction."""
    params = {"model.language_model.layers.0.mlp.up_proj.weight": torch.zeros(4, 5),
              "model.vision_tower.encoder.layers.0.mlp.fc1.weight": torch.zeros(10, 6)}
    tracker = UpdateTracker(params)
    params["model.language_model.layers.0.mlp.up_proj.weight"][0, :2] = 1.0
    params["model.vision_tower.encoder.layers.0.mlp.fc1.weight"][1, :3] = 1.0
    metrics = tracker.metrics(tracker.update(1))
    assert metrics["tower/text/changed/exact"] == pytest.approx(2 / 20)
    assert metrics["tower/vision/changed/exact"] == pytest.approx(3 / 60)
    assert metrics["changed/exact"] == pytest.approx(5 / 80)
    assert metrics["module/vision/relative"] == pytest.approx(3 / 60)
    assert "abs_delta/layer_0/max" in metrics and metrics["abs_delta/outside/mean"] == pytest.approx(3 / 60)
    plain = UpdateTracker({"h.0.attn.c_attn.weight": torch.zeros(3)})  # a text-only model: no tower keys
    assert not any(k.startswith("tower/") for k in plain.metrics(plain.update(1)))


def _edge_params(device: str) -> tuple[dict, dict]:
    """θ0 and θ1 from test_changes.edge_pair (NaN/±inf, ±0, subnormals, overflowing |Δ|), one ragged
    tensor per dtype, so every dtype is a group of its own."""
    shapes = {torch.bfloat16: (37, 11), torch.float16: (CHUNK + 3,), torch.float32: (9, 5), torch.float64: (70,)}
    theta0, theta1 = {}, {}
    for i, (dtype, shape) in enumerate(shapes.items()):
        theta0[f"transformer.h.{i}.mlp.c_fc.weight"], theta1[f"transformer.h.{i}.mlp.c_fc.weight"] = \
            edge_pair(shape, dtype, seed=i)
    return {n: t.to(device) for n, t in theta0.items()}, {n: t.to(device) for n, t in theta1.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rules", EDGE_RULES, ids=["default", "zero", "big_eta"])
def test_tracker_equals_the_reference(rules, device):
    """Counts vs θ0 and vs the previous step, NaN/inf |Δ| and the |Δ| statistics of the tracker are the
    reference's, step after step (step 2 moves back to θ0: every change vs θ0 is one vs step 1)."""
    theta0, theta1 = _edge_params(device)
    params = {n: t.clone() for n, t in theta0.items()}
    tracker = UpdateTracker(params, rules)
    for step, (before, now) in enumerate([(theta0, theta1), (theta1, theta0)], start=1):
        for name, p in params.items():
            as_bits(p).copy_(as_bits(now[name]))
        record = tracker.update(step)
        for i, name in enumerate(record.names):
            vs0 = reference_stats(theta0[name].cpu(), now[name].cpu(), rules)
            vs1 = reference_stats(before[name].cpu(), now[name].cpu(), rules)
            assert {r: record.vs_initial[r][i] for r in RULES} == vs0.changed, (step, name)
            assert {r: record.vs_previous[r][i] for r in RULES} == vs1.changed, (step, name)
            assert record.nonfinite[i] == vs0.numel - vs0.finite_count, (step, name)
            ever = reference_stats(theta0[name].cpu(), theta1[name].cpu(), rules).changed["exact"]
            assert record.ever_changed[i] == ever, (step, name)
            assert record.abs_max[i] == vs0.abs_max, (step, name)
            assert record.abs_sum[i] == pytest.approx(vs0.abs_sum, rel=1e-5, abs=1e-300), (step, name)
            assert record.abs_sq_sum[i] == pytest.approx(vs0.abs_sq_sum, rel=1e-5, abs=1e-300), (step, name)
    assert sum(record.total("vs_previous", r) for r in RULES) > 0


def test_tracker_counts_a_new_rule(monkeypatch):
    """A rule added only to changes.TOLERANCE is counted vs θ0 and vs the previous step, and logged."""
    add_rule(monkeypatch, "loose", loose)
    rules = ChangeRules(atol=1e-4, eta=1e-3)
    theta0, theta1 = _edge_params("cpu")
    params = {n: t.clone() for n, t in theta0.items()}
    tracker = UpdateTracker(params, rules)
    for name, p in params.items():
        as_bits(p).copy_(as_bits(theta1[name]))
    record = tracker.update(1)
    want = [int(numpy_rules(theta0[n], theta1[n], 100 * rules.atol, rules.eta)["atol"].sum()) for n in record.names]
    assert record.vs_initial["loose"] == record.vs_previous["loose"] == want and all(want)
    for r in ("exact", "atol", "relative"):  # the other rules keep their own counts
        assert record.vs_initial[r] == [reference_stats(theta0[n], theta1[n], rules).changed[r] for n in record.names]
    assert tracker.metrics(record)["changed/loose"] == pytest.approx(sum(want) / sum(record.numel))
