"""ASPG: dense warm-up equal to AdamW, exactly the global top-k updated afterwards, error feedback
conserving the gradient; the research plan's variant (plain top-k step, no error feedback); both variants'
report and settings; the top-k DDP hook on 2 CPU processes (gloo) against a dense all-reduce."""
import json
import os
import socket
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from subnetscope.aspg import ASPG, PlanASPG, TopKHookState, topk_hook
from subnetscope.cli import grpo as grpo_cli
from subnetscope.grpo import GRPOConfig, GRPOTrainer
from subnetscope.rl import RLConfig
from subnetscope.runstate import settings_changes


def quadratic_grads(params, step: int):
    """Fixed pseudo-random gradients per step, the same for every optimizer under test."""
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def make_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(20, 10, generator=gen).requires_grad_(), torch.randn(35, generator=gen).requires_grad_()]


def test_warmup_steps_equal_adamw():
    a, b = make_params(), make_params()
    ours = ASPG(a, lr=1e-2, weight_decay=0.1, sparsity=0.9, warmup=3)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        quadratic_grads(a, step)
        quadratic_grads(b, step)
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)  # updates are ~1e-2


def test_sparse_steps_update_exactly_the_global_top_k_of_importance():
    params = make_params()
    opt = ASPG(params, lr=1e-2, weight_decay=0.1, sparsity=0.8, warmup=2, importance_beta=0.5)
    total = sum(p.numel() for p in params)
    importance = [torch.zeros_like(p) for p in params]
    for step in range(6):
        quadratic_grads(params, step)
        for imp, p in zip(importance, params):
            imp.mul_(0.5).add_(p.grad.abs(), alpha=0.5)
        before = [p.detach().clone() for p in params]
        opt.step()
        changed = [p.detach() != b for p, b in zip(params, before)]
        n_changed = sum(int(c.sum()) for c in changed)
        if step < 2:
            assert n_changed == total
            continue
        k = round(0.2 * total)
        assert n_changed == k == opt.last_updated
        flat = torch.cat([i.reshape(-1) for i in importance])
        top = torch.zeros(total, dtype=torch.bool)
        top[flat.topk(k).indices] = True
        assert torch.equal(torch.cat([c.reshape(-1) for c in changed]), top)


def test_error_feedback_carries_every_dropped_gradient():
    p = torch.zeros(4, requires_grad=True)
    opt = ASPG([p], lr=1e-3, sparsity=0.75, warmup=0, importance_beta=0.0)
    grads = [torch.tensor([4.0, 1.0, 0.5, 0.1]), torch.tensor([4.0, 1.0, 0.5, 0.1]), torch.tensor([0.0, 9.0, 0.5, 0.1])]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    # entry 0 was chosen at steps 1 and 2 (importance = |grad|), entry 1 at step 3; 2 and 3 never
    residual = opt.state[p]["residual"]
    assert residual.tolist() == pytest.approx([0.0, 0.0, 1.5, 0.3])
    assert opt.state[p]["updates"].tolist() == [2, 1, 0, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, density: float, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    state = TopKHookState(density, start_iter=1)
    buckets = []

    def recording_hook(hook_state, bucket):
        sent_in = bucket.buffer().clone()
        return topk_hook(hook_state, bucket).then(
            lambda fut: buckets.append((bucket.index(), sent_in, fut.value().clone())) or fut.value())

    # density 1: the hook itself, as users register it (DDP checks its signature); else a recording wrapper
    ddp.register_comm_hook(state, topk_hook if density == 1.0 else recording_hook)
    out = []
    for it in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * it + rank))
        local = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        dense = [g.clone() for g in local]
        for g in dense:
            dist.all_reduce(g)
            g /= world
        ddp.zero_grad()
        buckets.clear()
        ddp(x).square().mean().backward()
        out.append({"dense": dense, "synced": [p.grad.clone() for p in model.parameters()], "buckets": list(buckets)})
    results[rank] = {"steps": out, "bytes_sent": state.bytes_sent, "dense_bytes": state.dense_bytes}
    dist.destroy_process_group()


def run_ranks(density: float) -> dict:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, density, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    return dict(results)


@pytest.mark.slow
def test_topk_hook_with_density_one_is_the_dense_average():
    results = run_ranks(1.0)
    for step in results[0]["steps"]:
        for synced, dense in zip(step["synced"], step["dense"]):
            assert torch.allclose(synced, dense, atol=1e-6)


@pytest.mark.slow
def test_topk_hook_averages_exactly_where_nothing_was_dropped():
    results = run_ranks(0.25)
    r0, r1 = results[0]["steps"], results[1]["steps"]
    # iteration 0 is a plain all-reduce (DDP may rebuild buckets after it)
    for synced, dense in zip(r0[0]["synced"], r0[0]["dense"]):
        assert torch.allclose(synced, dense, atol=1e-6)
    # iteration 1, the first sparse one (no residual yet): in every bucket, an entry both ranks sent
    # is the dense mean of the two buffers; an entry neither sent is 0
    checked = 0
    for (i0, in0, out0), (i1, in1, out1) in zip(sorted(r0[1]["buckets"], key=lambda b: b[0]),
                                                sorted(r1[1]["buckets"], key=lambda b: b[0])):
        assert i0 == i1 and torch.equal(out0, out1)  # ranks agree
        k = max(1, -(-in0.numel() // 4))
        sent = [torch.zeros(g.numel(), dtype=torch.bool).index_fill_(0, g.abs().topk(k).indices, True)
                for g in (in0, in1)]
        both, neither = sent[0] & sent[1], ~sent[0] & ~sent[1]
        assert torch.allclose(out0[both], ((in0 + in1) / 2)[both], atol=1e-7)
        assert (out0[neither] == 0).all()
        checked += int(both.sum())
    assert checked > 0
    ratio = results[0]["bytes_sent"] / results[0]["dense_bytes"]
    assert 0.25 < ratio < 0.9  # one dense iteration of three, then ~25% of entries at 8 bytes each


@pytest.mark.parametrize("variant", ["aspg", "aspg_plan"])
def test_state_dict_round_trip_keeps_counts_exact_for_bf16_weights(variant):
    def fresh():
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(30, 10, generator=gen).bfloat16().requires_grad_()]

    def build(params):
        if variant == "aspg":
            return ASPG(params, lr=1e-2, sparsity=0.5, warmup=1)
        return PlanASPG(params, lr=1e-2, update_fraction=0.5, warmup=1)

    a, b = fresh(), fresh()
    opt_a, opt_b = build(a), build(b)
    for step in range(4):
        quadratic_grads(a, step)
        opt_a.step()
    state = opt_a.state_dict()
    b[0].data.copy_(a[0].data)
    opt_b.load_state_dict(state)
    assert opt_b.state[b[0]]["importance"].dtype == torch.float32
    assert variant == "aspg_plan" or opt_b.state[b[0]]["updates"].dtype == torch.int32
    for step in range(4, 7):
        for params, opt in ((a, opt_a), (b, opt_b)):
            quadratic_grads(params, step)
            opt.step()
    assert torch.equal(a[0], b[0])
    for key in opt_a.state[a[0]]:
        assert torch.equal(opt_a.state[a[0]][key], opt_b.state[b[0]][key]), key


def test_plan_variant_moves_exactly_k_entries_by_a_plain_step():
    params = make_params()  # 235 entries
    opt = PlanASPG(params, lr=1e-2, update_fraction=0.1, warmup=2)
    k = 23  # int(0.1 * 235), the plan's k
    importance = [torch.zeros_like(p) for p in params]
    for step in range(5):
        quadratic_grads(params, step)
        for imp, p in zip(importance, params):
            imp.mul_(0.9).add_(p.grad.abs(), alpha=0.1)
        before = [p.detach().clone() for p in params]
        expected = [b - 1e-2 * p.grad for b, p in zip(before, params)]  # w - lr * grad, nothing else
        opt.step()
        changed = torch.cat([(p.detach() != b).reshape(-1) for p, b in zip(params, before)])
        if step < 2:
            assert int(changed.sum()) == 235
            top = torch.ones(235, dtype=torch.bool)
        else:
            assert int(changed.sum()) == k == opt.last_updated
            top = torch.zeros(235, dtype=torch.bool)
            top[torch.cat([i.reshape(-1) for i in importance]).topk(k).indices] = True
            assert torch.equal(changed, top)
        now = torch.cat([p.detach().reshape(-1) for p in params])
        assert torch.equal(now[top], torch.cat([e.reshape(-1) for e in expected])[top])
        assert torch.equal(now[~top], torch.cat([b.reshape(-1) for b in before])[~top])
    assert all(set(opt.state[p]) == {"step", "importance"} for p in params)  # no error-feedback buffer, no moments


def test_plan_variant_drops_the_gradients_it_does_not_use():
    p = torch.zeros(4, requires_grad=True)
    opt = PlanASPG([p], lr=0.5, update_fraction=0.25, warmup=0, importance_beta=0.0)  # k = 1, importance = |grad|
    for g in ([4.0, 1.0, 0.5, 0.1], [0.0, 1.0, 0.5, 0.1]):
        p.grad = torch.tensor(g)
        opt.step()
    # step 1 moves entry 0 by -0.5 * 4; step 2 entry 1 by -0.5 * 1 (with error feedback it would be 2, not 1)
    assert p.tolist() == [-2.0, -0.5, 0.0, 0.0]


def test_plan_variant_on_bf16_weights_rounds_the_float32_step_once():
    p = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.bfloat16, requires_grad=True)
    opt = PlanASPG([p], lr=1e-2, update_fraction=0.5, warmup=0, importance_beta=0.0)
    p.grad = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.bfloat16)
    opt.step()
    grad = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.bfloat16).float()
    moved = (torch.tensor([0.5, -0.25, 0.125, 1.0]) - 1e-2 * grad).bfloat16()
    assert p.tolist() == [0.5, moved[1].item(), 0.125, moved[3].item()]  # the two largest |grad| moved
    assert opt.state[p]["importance"].dtype == torch.float32


@pytest.mark.parametrize("variant", ["aspg", "aspg_plan"])
def test_report_share_state_bytes_and_flops_saved_by_hand(variant):
    params = make_params()  # 2 tensors, 235 entries
    if variant == "aspg":
        opt = ASPG(params, lr=1e-2, sparsity=0.8, warmup=1)
        k, per_entry, state = 47, 20, 235 * (4 * 4 + 4) + 2 * 8  # 4 float32 buffers + int32 counts + 2 steps
    else:
        opt = PlanASPG(params, lr=1e-2, update_fraction=0.2, warmup=1)
        k, per_entry, state = 47, 2, 235 * 4 + 2 * 8  # the importance EMA + 2 steps
    for step in range(3):
        quadratic_grads(params, step)
        opt.step()
        if step == 1:
            first = opt.report()  # the dense step 1 and the sparse step 2
    assert first["aspg/updated_share"] == pytest.approx((235 + k) / 470)
    assert first["aspg/update_flops_saved"] == (235 - k) * per_entry / 2
    second = opt.report()  # step 3 alone
    assert second == {"aspg/updated_share": pytest.approx(k / 235),
                      "aspg/update_flops_saved": (235 - k) * per_entry, "aspg/state_bytes": state}


def test_each_variant_gets_its_own_defaults():
    plan = RLConfig(optimizer="aspg_plan")
    assert (plan.aspg_update_fraction, plan.aspg_warmup, plan.aspg_sparsity) == (0.01, 100, None)
    today = RLConfig(optimizer="aspg")
    assert (today.aspg_sparsity, today.aspg_warmup, today.aspg_update_fraction) == (0.9, 10, None)
    # what every run recorded before aspg_plan existed, so that their --resume finds the same settings
    assert (RLConfig().aspg_sparsity, RLConfig().aspg_warmup) == (0.9, 10)
    assert RLConfig(optimizer="aspg_plan", aspg_warmup=0).aspg_warmup == 0
    recorded = {"optimizer": "adamw", "aspg_sparsity": 0.9, "aspg_warmup": 10}  # a run_config.json before this
    assert settings_changes(recorded, asdict(RLConfig())) == []


def refused(capsys, argv: list[str], *needles: str) -> None:
    with pytest.raises(SystemExit) as exc:
        grpo_cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("flags, needles", [
    (["--optimizer", "aspg_plan", "--aspg_sparsity", "0.99"], ["--aspg_sparsity", "--aspg_update_fraction"]),
    (["--optimizer", "aspg", "--aspg_sparsity", "0.9", "--aspg_update_fraction", "0.1"],
     ["--aspg_update_fraction", "--aspg_sparsity", "--optimizer aspg_plan"]),
    (["--aspg_update_fraction", "0.01"], ["--aspg_update_fraction", "--optimizer adamw"]),
    (["--optimizer", "aspg_plan", "--aspg_update_fraction", "0"], ["--aspg_update_fraction must be in (0, 1]"]),
    (["--optimizer", "aspg_plan", "--aspg_update_fraction", "nan"], ["--aspg_update_fraction must be in (0, 1]"]),
    (["--optimizer", "aspg", "--aspg_sparsity", "1"], ["--aspg_sparsity must be in [0, 1)"]),
    (["--optimizer", "aspg_plan", "--aspg_warmup", "-1"], ["--aspg_warmup must be >= 0"]),
    (["--optimizer", "aspg_plan", "--weight_decay", "0.1"], ["--weight_decay", "aspg_plan"]),
    (["--ddp_topk_density", "0"], ["--ddp_topk_density must be in (0, 1]"]),
    (["--ddp_topk_density", "0.1"], ["--ddp_topk_density", "1 process(es)", "torchrun"]),
])
def test_aspg_and_hook_flags_are_refused_in_one_line(capsys, tmp_path, flags, needles):
    out = tmp_path / "run"
    refused(capsys, ["--easy", "--policy", "tiny-gpt2", "--device", "cpu", "--output_dir", str(out), *flags], *needles)
    assert not out.exists()


def test_plan_variant_in_grpo_logs_its_share_state_and_flops(tmp_path):
    config = GRPOConfig(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="fp32",
                        batch_size=4, max_new_tokens=6, lr=1e-3, max_steps=3, save_every=3, eval_every=3,
                        output_dir=str(tmp_path / "run"), no_tqdm=True, optimizer="aspg_plan",
                        aspg_update_fraction=0.05, aspg_warmup=2)
    trainer = GRPOTrainer(config)
    trainer.train()
    params = list(trainer.policy.parameters())
    total = sum(p.numel() for p in params)
    k = int(0.05 * total)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["aspg/updated_share"] for r in records] == [1.0, 1.0, pytest.approx(k / total)]
    assert [r["aspg/update_flops_saved"] for r in records] == [0.0, 0.0, (total - k) * 2]
    assert all(r["aspg/state_bytes"] == total * 4 + len(params) * 8 for r in records)
    assert 0 < records[2]["step_change/exact"] * sum(p.numel() for p in trainer.params.values()) <= k
