"""The flat, chunked tracker against a direct per-tensor computation of the same rules."""
import torch

from subnetscope.changes import RULES, ChangeRules, changed_masks
from subnetscope.tracker import CHUNK, UpdateTracker


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
