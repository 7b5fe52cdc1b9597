"""GRPO speed on a GPU, measured side by side in one run, each configuration in a fresh process.

  ours    : subnetscope's GRPO loop with its tracker (compiled on CUDA)
  naive   : the same loop with the naive tracker (clone every parameter every step, .item() per tensor)
  trl     : TRL's GRPOTrainer with the same model, prompts, batch, group size, lengths and loss, no vLLM

The model has GPT-2-medium shapes (355M parameters, random weights, bf16) and the real GPT-2
tokenizer (--tokenizer, e.g. a copy of ../shared/models/tiny-gpt2). Reports tracker overhead as a
share of the step, generated tokens/s and steps/s, and peak GPU memory.
Run: python benchmarks/bench_grpo.py --tokenizer DIR [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, GROUP, PROMPT_TOKENS, NEW_TOKENS = 16, 4, 32, 64


def build_model(workdir: Path, tokenizer: str) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = workdir / "gpt2-medium-random"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16)).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


def easy_reward(completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


def run_ours(model: str, steps: int, naive: bool) -> dict:
    import torch

    import subnetscope.grpo as grpo
    import subnetscope.rl as rl
    from subnetscope.tracker import UpdateTracker

    class NaiveTracker(UpdateTracker):
        """Clone every parameter every step and read each count with its own .item()."""

        @torch.no_grad()
        def update(self, step):
            from subnetscope.changes import RULES, changed_masks
            from subnetscope.tracker import StepCounts

            vs_init, vs_prev = {r: [] for r in RULES}, {r: [] for r in RULES}
            for name, p in self.params.items():
                current = p.detach().clone()
                m0 = changed_masks(self.initial[name], current, self.rules)
                m1 = changed_masks(self.previous[name], current, self.rules)
                for r in RULES:
                    vs_init[r].append(m0[r].sum().item())
                    vs_prev[r].append(m1[r].sum().item())
                self.previous[name] = current
            names = list(self.params)
            return StepCounts(step, names, [self.params[n].numel() for n in names], vs_init, vs_prev,
                              [0] * len(names))

    if naive:
        rl.UpdateTracker = NaiveTracker
    cfg = grpo.GRPOConfig(policy=model, reward="easy", dataset="builtin", batch_size=BATCH, group_size=GROUP,
                          max_prompt_tokens=PROMPT_TOKENS, max_new_tokens=NEW_TOKENS, max_steps=steps,
                          save_every=10**6, eval_every=10**6, dtype="bfloat16", device="cuda", lr=1e-6,
                          output_dir=f"/tmp/bench-grpo-{'naive' if naive else 'ours'}-{time.time_ns()}",
                          no_tqdm=True)
    trainer = grpo.GRPOTrainer(cfg)
    torch.cuda.reset_peak_memory_stats()
    times, tracker_times, tokens = [], [], []
    for step in range(1, steps + 1):
        m = trainer.train_step(step)
        times.append(m["time/step"])
        tracker_times.append(m["time/tracker"])
        tokens.append(m["completion_length"] * BATCH * GROUP)
    warm = slice(2, None)
    step_time = statistics.median(times[warm])
    return {"step_s": step_time, "tracker_s": statistics.median(tracker_times[warm]),
            "rollout_s": m["time/rollout"],
            "tokens_per_s": statistics.mean(tokens[warm]) / step_time, "steps_per_s": 1 / step_time,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30, "all_step_s": [round(t, 3) for t in times]}


def run_trl(model: str, steps: int) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from subnetscope.data import BUILTIN_PROMPTS

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    lengths = []

    def reward(completions, completion_ids, **kw):
        lengths.append(sum(len(ids) for ids in completion_ids))
        return easy_reward(completions, completion_ids)

    args = GRPOConfig(output_dir=f"/tmp/bench-trl-{time.time_ns()}", per_device_train_batch_size=BATCH * GROUP,
                      num_generations=GROUP, max_completion_length=NEW_TOKENS, max_steps=steps, learning_rate=1e-6,
                      beta=0.04, epsilon=0.2, loss_type="grpo", temperature=1.0, bf16=True, report_to="none",
                      save_strategy="no", logging_steps=10**6, gradient_checkpointing=False, disable_dropout=True,
                      model_init_kwargs={"dtype": torch.bfloat16})
    prompts = [p for p in BUILTIN_PROMPTS] * 20
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warm = slice(2, None)
    step_time = statistics.median(timer.times[warm])
    return {"step_s": step_time, "tokens_per_s": statistics.mean(lengths[warm]) / step_time,
            "steps_per_s": 1 / step_time, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
            "all_step_s": [round(t, 3) for t in timer.times]}


def check_compiled_tracker_equals_eager() -> str:
    """On the GPU, the compiled per-tensor kernel must give the eager kernel's counts."""
    import torch

    from subnetscope.tracker import UpdateTracker

    torch.manual_seed(0)
    params = {f"transformer.h.{i}.mlp.c_fc.weight": torch.randn(512, 2048, device="cuda").to(torch.bfloat16)
              for i in range(4)}
    eager = UpdateTracker(params, compile=False)
    fast = UpdateTracker(params, compile=True)
    for step in (1, 2, 3):
        for p in params.values():
            p.add_(torch.randn_like(p) * 1e-3 * (torch.rand_like(p.float()) < 0.3))
        a, b = eager.update(step), fast.update(step)
        assert a.vs_initial == b.vs_initial and a.vs_previous == b.vs_previous and a.ever_changed == b.ever_changed
    return "compiled tracker == eager tracker on 3 steps"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with the GPT-2 tokenizer files")
    p.add_argument("--steps", type=int, default=10, help="GRPO steps per configuration (first 2 are warm-up)")
    p.add_argument("--workdir", default="/tmp/subnetscope-bench")
    p.add_argument("--only", choices=("ours", "naive", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        result = run_trl(args.model, args.steps) if args.only == "trl" else run_ours(args.model, args.steps, args.only == "naive")
        print(json.dumps(result))
        return
    model = build_model(Path(args.workdir), args.tokenizer)
    print(check_compiled_tracker_equals_eager())
    results = {}
    for which in ("ours", "naive", "trl"):
        out = subprocess.run([sys.executable, __file__, "--tokenizer", args.tokenizer, "--steps", str(args.steps),
                              "--only", which, "--model", str(model)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(which, json.dumps(results[which]))
    o, n, t = results["ours"], results["naive"], results["trl"]
    print(f"\nGPT-2-medium shapes, bf16, {BATCH} prompts x {GROUP} completions, {NEW_TOKENS} new tokens")
    print(f"tracker overhead, ours : {o['tracker_s'] * 1e3:.1f} ms of a {o['step_s']:.3f} s step = "
          f"{100 * o['tracker_s'] / o['step_s']:.2f}% (target <= 2%)")
    print(f"tracker overhead, naive: {n['tracker_s'] * 1e3:.1f} ms of a {n['step_s']:.3f} s step = "
          f"{100 * n['tracker_s'] / n['step_s']:.2f}%")
    print(f"throughput ours: {o['tokens_per_s']:.0f} tokens/s, {o['steps_per_s']:.3f} steps/s, peak {o['peak_gpu_gb']:.1f} GB")
    print(f"throughput TRL : {t['tokens_per_s']:.0f} tokens/s, {t['steps_per_s']:.3f} steps/s, peak {t['peak_gpu_gb']:.1f} GB")
    print(f"ours / TRL     : {o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s (target >= 1.5x)")


if __name__ == "__main__":
    main()
