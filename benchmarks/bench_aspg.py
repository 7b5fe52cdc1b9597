"""The two ASPG variants beside AdamW on one model: the share of weights each step updates, the optimizer
state's bytes, and the update FLOPs a sparse kernel would skip (estimated: subnetscope/aspg.py's docstring).

A GPT-2 from a small config (6 x 384, 30M parameters, random weights) takes --steps steps of language-model
loss on random tokens (batch 4 x 64) under each optimizer, from the same weights and batches: AdamW, ASPG
(`--optimizer aspg`: AdamW + error feedback, sparsity 0.9) and the research plan's ASPG (`--optimizer
aspg_plan`: plain top-k step, update fraction 0.01), both with a 1-step warm-up. Per optimizer it prints,
for the steps after the warm-up: the share of weights whose value changed (counted from the weights
themselves) beside the share the optimizer reports updating, the state's bytes and bytes per weight, the
update FLOPs saved per step and their share of the step's forward + backward FLOPs (6 per weight per
token), and the seconds of optimizer.step() (the dense implementation: no time is saved).
Run: python benchmarks/bench_aspg.py [--steps 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(name: str, steps: int, device: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from subnetscope.aspg import ASPG, PlanASPG, state_bytes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=128, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)).to(device)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    optimizer = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-4),
                 "aspg": lambda: ASPG(params, lr=1e-4, sparsity=0.9, warmup=1),
                 "aspg_plan": lambda: PlanASPG(params, lr=1e-4, update_fraction=0.01, warmup=1)}[name]()
    changed, reported, seconds, flops_saved = [], [], [], []
    tokens = 4 * 64
    for step in range(steps):
        ids = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(step)).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        before = [p.detach().clone() for p in params]
        t0 = time.perf_counter()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)
        changed.append(sum(int((p.detach() != b).sum()) for p, b in zip(params, before)) / total)
        report = optimizer.report() if hasattr(optimizer, "report") else {}
        reported.append(report.get("aspg/updated_share", 1.0))
        flops_saved.append(report.get("aspg/update_flops_saved", 0.0))
    def mean(values: list[float]) -> float:
        return sum(values[1:]) / len(values[1:])  # the steps after the warm-up

    state = state_bytes(optimizer)
    return {"changed": mean(changed), "reported": mean(reported), "state": state, "per_weight": state / total,
            "flops_saved": mean(flops_saved), "flops_share": mean(flops_saved) / (6 * total * tokens),
            "seconds": mean(seconds), "total": total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="steps per optimizer, at least 2 (default 4)")
    p.add_argument("--device", default="cpu", help="(default cpu)")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first is the warm-up)")
    rows = {name: run(name, args.steps, args.device) for name in ("adamw", "aspg", "aspg_plan")}
    total = rows["adamw"]["total"]
    print(f"GPT-2 6 x 384 ({total:,} weights), batch 4 x 64 random tokens, {args.device}; steps 2-{args.steps}:")
    print("optimizer | weights changed per step | updated per step (reported) | state bytes | bytes per weight "
          "| update FLOPs saved per step | of forward + backward | optimizer.step() s")
    for name, r in rows.items():
        print(f"{name} | {r['changed']:.4%} | {r['reported']:.4%} | {r['state']:,} | {r['per_weight']:.2f} | "
              f"{r['flops_saved']:,.0f} | {r['flops_share']:.2e} | {r['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
