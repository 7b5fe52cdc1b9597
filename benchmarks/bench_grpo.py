"""GRPO speed on a GPU, measured side by side in one run, each configuration in a fresh process.

  ours    : subnetscope's GRPO loop with its trackers (compiled on CUDA)
  naive   : the same loop with the naive tracker (clone every parameter every step, .item() per tensor)
  trl     : TRL's GRPOTrainer with the same model, prompts, batch, group size, lengths and loss, no vLLM
  trl_tracked: the same TRL run with SubnetTrackerCallback (judged at bf16 under mixed); its hooks are
            timed inside the step, so its overhead is a share of the same run's step (target <= 2%)

--precision (default mixed) is ours' --precision; TRL gets its equivalent: mixed = an fp32-loaded model
with bf16=True (autocast), bf16 = a bf16 model with bf16=True, fp32 = fp32 throughout. Under mixed ours
runs two trackers (the bf16 view and the fp32 masters); the overhead reported is both together.
The model is a folder (--policy, e.g. SmolLM2; its tokenizer unless --tokenizer says otherwise) or, by
default, GPT-2-medium shapes (355M parameters, random weights) with the real GPT-2 tokenizer
(--tokenizer, e.g. a copy of ../shared/models/tiny-gpt2). Both sides get the same plain prompts (no
chat template). Reports tracker overhead as a share of the step, generated tokens/s and steps/s, and
peak GPU memory.
Run: python benchmarks/bench_grpo.py --tokenizer DIR [--steps 10] [--precision mixed]
     python benchmarks/bench_grpo.py --policy DIR
     python benchmarks/bench_grpo.py --tiny   (CPU, tiny shapes, 3 steps: a check that it runs)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from subnetscope.errors import ArgumentParser, cli_main  # noqa: E402


@dataclass(frozen=True)
class Shape:
    batch: int
    group: int
    prompt_tokens: int
    new_tokens: int


CONFIGURATIONS = ("ours", "naive", "trl", "trl_tracked")
GPU_SHAPE = Shape(batch=16, group=4, prompt_tokens=32, new_tokens=64)
TINY_SHAPE = Shape(batch=2, group=2, prompt_tokens=8, new_tokens=8)


def build_model(workdir: Path, tokenizer: str | None, tiny: bool) -> Path:
    """GPT-2-medium shapes (or tiny ones) with random weights, saved in bf16 with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from subnetscope.models import tiny_gpt2_config, word_tokenizer

    folder = workdir / ("gpt2-tiny-random" if tiny else "gpt2-medium-random")
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else word_tokenizer()
    torch.manual_seed(0)
    config = tiny_gpt2_config(vocab_size=len(tok)) if tiny else GPT2Config(n_layer=24, n_embd=1024, n_head=16)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def easy_reward(completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


def run_ours(model: str, tokenizer: str | None, steps: int, naive: bool, precision: str, device: str,
             shape: Shape) -> dict:
    import torch

    import subnetscope.grpo as grpo
    import subnetscope.rl as rl
    from subnetscope.tracker import UpdateTracker

    class NaiveTracker(UpdateTracker):
        """Clone every parameter (as judged) every step and read each count with its own .item()."""

        @torch.no_grad()
        def update(self, step):
            from subnetscope.changes import RULES, changed_masks
            from subnetscope.tracker import StepCounts

            vs_init, vs_prev = {r: [] for r in RULES}, {r: [] for r in RULES}
            for name in self.params:
                current = self.published(name).clone()
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
    cfg = grpo.GRPOConfig(policy=model, tokenizer=tokenizer, reward="easy", dataset="builtin", batch_size=shape.batch,
                          group_size=shape.group, max_prompt_tokens=shape.prompt_tokens,
                          max_new_tokens=shape.new_tokens, max_steps=steps, save_every=10**6, eval_every=10**6,
                          precision=precision, device=device, lr=1e-6, chat_template=False,
                          output_dir=f"/tmp/bench-grpo-{'naive' if naive else 'ours'}-{time.time_ns()}",
                          no_tqdm=True)
    trainer = grpo.GRPOTrainer(cfg)
    reset_peak(device)
    times, tracker_times, tokens = [], [], []
    for step in range(1, steps + 1):
        m = trainer.train_step(step)
        times.append(m["time/step"])
        tracker_times.append(m["time/tracker"])
        tokens.append(m["completion_length"] * shape.batch * shape.group)
    warm = slice(2, None)
    step_time = statistics.median(times[warm])
    return {"precision": trainer.precision.name, "step_s": step_time,
            "tracker_s": statistics.median(tracker_times[warm]), "rollout_s": m["time/rollout"],
            "tokens_per_s": statistics.mean(tokens[warm]) / step_time, "steps_per_s": 1 / step_time,
            "peak_gpu_gb": peak_gb(device), "all_step_s": [round(t, 3) for t in times]}


def trl_dtype_and_bf16(precision: str):
    """TRL's equivalent of our --precision: the dtype the model is loaded in, and its bf16 (autocast) flag."""
    import torch

    return {"mixed": (torch.float32, True), "bf16": (torch.bfloat16, True), "fp32": (torch.float32, False)}[precision]


def run_trl(model: str, tokenizer: str | None, steps: int, precision: str, device: str, shape: Shape,
            tracked: bool = False) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from subnetscope.callback import SubnetTrackerCallback
    from subnetscope.data import BUILTIN_PROMPTS

    class TimedTracker(SubnetTrackerCallback):
        """The callback with its per-step work (on_optimizer_step) timed, synchronized before and after."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.seconds: list[float] = []

        def _timed(self, hook, *args, **kw):
            synchronize(device)
            t0 = time.perf_counter()
            out = hook(*args, **kw)
            synchronize(device)
            self.seconds[-1] += time.perf_counter() - t0
            return out

        def on_optimizer_step(self, *args, **kw):
            self.seconds.append(0.0)
            return self._timed(super().on_optimizer_step, *args, **kw)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            synchronize(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize(device)
            self.times.append(time.perf_counter() - self.t0)

    lengths = []

    def reward(completions, completion_ids, **kw):
        lengths.append(sum(len(ids) for ids in completion_ids))
        return easy_reward(completions, completion_ids)

    dtype, bf16 = trl_dtype_and_bf16(precision)
    args = GRPOConfig(output_dir=f"/tmp/bench-trl-{time.time_ns()}",
                      per_device_train_batch_size=shape.batch * shape.group, num_generations=shape.group,
                      max_completion_length=shape.new_tokens, max_steps=steps,
                      learning_rate=1e-6, beta=0.04, epsilon=0.2, loss_type="grpo", temperature=1.0, bf16=bf16,
                      report_to="none", save_strategy="no", logging_steps=10**6, gradient_checkpointing=False,
                      disable_dropout=True, use_cpu=device == "cpu", model_init_kwargs={"dtype": dtype})
    prompts = [p for p in BUILTIN_PROMPTS] * 20
    timer = StepTimer()
    tracker = TimedTracker(view_dtype=torch.bfloat16 if precision == "mixed" else None) if tracked else None
    callbacks = [timer, *([tracker] if tracker else [])]
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, callbacks=callbacks,
                          processing_class=AutoTokenizer.from_pretrained(tokenizer or model),
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    reset_peak(device)
    trainer.train()
    warm = slice(2, None)
    step_time = statistics.median(timer.times[warm])
    return {"step_s": step_time, "tokens_per_s": statistics.mean(lengths[warm]) / step_time,
            "steps_per_s": 1 / step_time, "peak_gpu_gb": peak_gb(device),
            "tracker_s": statistics.median(tracker.seconds[warm]) if tracker else None,
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


@cli_main
def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="a model folder (default: GPT-2-medium shapes with random weights)")
    p.add_argument("--tokenizer", help="tokenizer folder: required without --policy (the GPT-2 tokenizer files); "
                                       "with --policy, the model folder's by default")
    p.add_argument("--precision", default="mixed", choices=("mixed", "bf16", "fp32"), help="(default mixed)")
    p.add_argument("--steps", type=int, default=10, help="GRPO steps per configuration (first 2 are warm-up)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, 3 steps: checks that the benchmark runs")
    p.add_argument("--workdir", default="/tmp/subnetscope-bench")
    p.add_argument("--configs", nargs="+", choices=CONFIGURATIONS, default=list(CONFIGURATIONS),
                   help="configurations to run, each in its own process (default all)")
    p.add_argument("--only", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    args = p.parse_args()
    device, shape = ("cpu", TINY_SHAPE) if args.tiny else ("cuda", GPU_SHAPE)
    steps = 3 if args.tiny else args.steps
    if args.only:
        if args.only.startswith("trl"):
            result = run_trl(args.policy, args.tokenizer, steps, args.precision, device, shape,
                             tracked=args.only == "trl_tracked")
        else:
            result = run_ours(args.policy, args.tokenizer, steps, args.only == "naive", args.precision, device, shape)
        print(json.dumps(result))
        return
    if not args.policy and not args.tokenizer and not args.tiny:
        p.error("pass --tokenizer (the GPT-2 tokenizer files) for the random GPT-2-medium model, or --policy DIR")
    model = args.policy or str(build_model(Path(args.workdir), args.tokenizer, args.tiny))
    if device == "cuda":
        print(check_compiled_tracker_equals_eager())
    results = {}
    for which in args.configs:
        command = [sys.executable, __file__, "--policy", model, "--steps", str(steps), "--precision", args.precision,
                   "--only", which, *(["--tiny"] if args.tiny else []),
                   *(["--tokenizer", args.tokenizer] if args.tokenizer and args.policy else [])]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(which, json.dumps(results[which]))
    print(f"\n{Path(model).name}, --precision {args.precision}, {shape.batch} prompts x {shape.group} completions, "
          f"{shape.new_tokens} new tokens, on {device}")
    report(results)


def report(results: dict[str, dict]) -> None:
    """One line per figure the configurations that ran allow."""
    for which in ("ours", "naive"):
        if which in results:
            r = results[which]
            print(f"tracker overhead, {which:5s}: {r['tracker_s'] * 1e3:.1f} ms of a {r['step_s']:.3f} s step = "
                  f"{100 * r['tracker_s'] / r['step_s']:.2f}%" + (" (target <= 2%)" if which == "ours" else ""))
    if "trl_tracked" in results:
        r = results["trl_tracked"]
        print(f"SubnetTrackerCallback on TRL: {r['tracker_s'] * 1e3:.1f} ms of a {r['step_s']:.3f} s step = "
              f"{100 * r['tracker_s'] / r['step_s']:.2f}% (target <= 2%)")
    for label, which in (("ours", "ours"), ("TRL ", "trl"), ("TRL + callback", "trl_tracked")):
        if which in results:
            r = results[which]
            print(f"throughput {label}: {r['tokens_per_s']:.0f} tokens/s, {r['steps_per_s']:.3f} steps/s, "
                  f"peak {r['peak_gpu_gb']:.1f} GB")
    if "ours" in results and "trl" in results:
        print(f"ours / TRL     : {results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x tokens/s "
              "(target >= 1.5x)")


if __name__ == "__main__":
    main()
