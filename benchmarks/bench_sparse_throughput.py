"""Training throughput (samples/s) against batch size at each sparsity, side by side in one run.

For every fine-tuning method (masked: the pruned model's own weights, gradients masked and pruned
entries held at zero; lora: sparse LoRA on PEFT, sparse_to_sparse) and every sparsity (a
per-matrix magnitude mask of the linear weights), one AdamW step of a GPT-2-small-shaped model
(124M parameters, random weights, bf16 autocast on a GPU) is timed at each batch size, batches above
--micro_batch accumulated over micro-batches. Prints
samples/s and the ratio to the dense run (sparsity 0) of the same method and batch size; writes
throughput.csv and throughput_vs_batch.png. A batch that does not fit is recorded as "oom".
Run: python benchmarks/bench_sparse_throughput.py --device cuda [--steps 5] [--output_dir DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(method: str, sparsity: float, device: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from subnetscope.confine import ConfinedUpdates
    from subnetscope.importance import importance_scores, prunable_tensors, select_masks
    from subnetscope.sparse_lora import add_sparse_lora

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    tensors = prunable_tensors(model)
    masks = select_masks(importance_scores(model, tensors, "magnitude"), tensors, sparsity, "unstructured", "matrix")
    confined = None
    if method == "lora":
        model = add_sparse_lora(model, masks, "sparse_to_sparse", rank=16, alpha=32).to(device)
    else:
        model = model.to(device)
        confined = ConfinedUpdates(dict(model.named_parameters()), masks)
        confined.project_()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, confined, torch.optim.AdamW(params, lr=1e-5)


def time_steps(model, confined, optimizer, batch: int, micro: int, seq_len: int, steps: int, device: str) -> float:
    """Samples per second over `steps` timed optimizer steps after one untimed warm-up step; a batch
    larger than `micro` is accumulated over micro-batches (the logits of 512 x 128 tokens alone
    would take ~40 GB in float32)."""
    import torch

    ids = torch.randint(0, 50257, (batch, seq_len), device=device)

    def step():
        for chunk in ids.split(micro):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                logits = model(input_ids=chunk, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float()[:, :-1].flatten(0, 1), chunk[:, 1:].flatten())
            (loss * len(chunk) / batch).backward()
        if confined:
            confined.mask_gradients_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if confined:
            confined.project_()

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    import torch

    from subnetscope import plots
    from subnetscope.report import write_csv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--methods", nargs="+", default=["masked", "lora"], choices=["masked", "lora"])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.9], help="(default 0.0 0.5 0.9)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512], help="(default 32 ... 512)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sample (default 128)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per point (default 5)")
    p.add_argument("--micro_batch", type=int, default=128,
                   help="largest forward/backward; bigger batches accumulate (default 128)")
    p.add_argument("--output_dir", default="plots/throughput", help="CSV and figure (default plots/throughput)")
    args = p.parse_args()
    rows = []
    for method in args.methods:
        for sparsity in args.sparsity:
            model, confined, optimizer = build(method, sparsity, args.device)
            for batch in args.batch_sizes:
                try:
                    rate = time_steps(model, confined, optimizer, batch, args.micro_batch, args.seq_len, args.steps,
                                      args.device)
                except torch.cuda.OutOfMemoryError:
                    rate = None
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                rows.append({"method": method, "sparsity": sparsity, "batch_size": batch, "samples_per_s": rate})
                print(f"{method:6s} sparsity {sparsity:.2f} batch {batch:4d}: "
                      + (f"{rate:8.1f} samples/s" if rate else "oom"), flush=True)
            del model, optimizer, confined
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    dense = {(r["method"], r["batch_size"]): r["samples_per_s"] for r in rows if r["sparsity"] == min(args.sparsity)}
    for r in rows:
        ref = dense.get((r["method"], r["batch_size"]))
        r["ratio_to_dense"] = r["samples_per_s"] / ref if r["samples_per_s"] and ref else None
    out = Path(args.output_dir)
    write_csv(out / "throughput.csv", rows)
    plots.throughput_vs_batch(rows, out / "throughput_vs_batch.png")
    print("\nsamples/s (ratio to the dense run of the same method and batch size)")
    for method in args.methods:
        for batch in args.batch_sizes:
            cells = [r for r in rows if r["method"] == method and r["batch_size"] == batch]
            text = "  ".join(f"s={r['sparsity']:.2f}: " + (f"{r['samples_per_s']:.1f} ({r['ratio_to_dense']:.2f}x)"
                                                          if r["samples_per_s"] else "oom") for r in cells)
            print(f"{method:6s} batch {batch:4d}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
