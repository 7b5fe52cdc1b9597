"""main_grpo.py: GRPO fine-tuning that records, while it trains, which weights change."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import GRPOConfig
from ..errors import cli_main
from .dataclass_args import given_settings
from .training import config_from_args, new_parser, quiet_transformers, run

DESCRIPTION = """\
Fine-tune a causal LM with GRPO (our own loop; TRL's loss_type="grpo") and track, after every
update, which weights differ from θ0 and from the previous update, under three rules (bits
differ; |Δ| > atol; |Δ| > eta·max|w|). Writes a run folder that analyze_sparse_subnetwork.py and
localization_analysis.py read: base/ (θ0), step_N/ checkpoints, metrics.jsonl, final/.
Presets (--config and explicit flags win over them): --smoke, --short, --easy, and --demo, the README's first
command: short runs of tiny GPT-2 and tiny Gemma-3n, then both analyses, figures in plots/demo/.
Policies: a Hub id, a local folder, or tiny-gpt2 / tiny-gemma3n (random weights, offline,
word-level tokenizer). Many GPUs: accelerate launch --num_processes N main_grpo.py ...;
many CPU processes: torchrun --nproc_per_node N main_grpo.py --device cpu ...
"""
PRESET_EXTRA = {"smoke": {"group_size": 2, "output_dir": "checkpoints/smoke"}}


def __getattr__(name: str):
    """`GRPOTrainer` imported on first use: it loads torch and transformers, which parsing does not need."""
    if name == "GRPOTrainer":
        from ..grpo import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION, GRPOConfig, PRESET_EXTRA)
    p.add_argument("--demo", action="store_true",
                   help="short GRPO runs of tiny GPT-2 and tiny Gemma-3n, then both analyses (offline)")
    return p


def grpo_config(args: argparse.Namespace) -> GRPOConfig:
    return config_from_args(GRPOConfig, args, PRESET_EXTRA)


def run_demo(args: argparse.Namespace) -> None:
    """Short GRPO runs of tiny GPT-2 and tiny Gemma-3n, then both analyses, figures in plots/demo/; the
    demo's step count and learning rate unless --config or a flag gives them."""
    from ..grpo import GRPOTrainer
    from . import analyze, localize

    given = given_settings(GRPOConfig, args)
    root = Path(given.get("output_dir", "checkpoints/demo"))
    runs = {}
    for arch in ("gpt2", "gemma3n"):
        cfg = grpo_config(args)
        cfg.policy, cfg.device, cfg.output_dir = f"tiny-{arch}", "cpu", str(root / arch)
        if "max_steps" not in given:
            cfg.max_steps, cfg.save_every, cfg.eval_every = 6, 2, 3
        if "lr" not in given:
            cfg.lr = 1e-3
        cfg.resume = (root / arch / "run_config.json").exists()
        run(GRPOTrainer, cfg)
        runs[arch] = cfg.output_dir
        analyze.main(["--ckpt_dir", cfg.output_dir, "--output_dir", f"plots/demo/{arch}", "--no_tqdm"])
    localize.main(["--ckpt_dirs", runs["gpt2"], runs["gemma3n"], "--labels", "tiny-gpt2", "tiny-gemma3n",
                   "--output_dir", "plots/demo/comparative", "--no_tqdm"])


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = grpo_config(args)  # the settings and the --config file are checked before anything loads
    quiet_transformers()
    if getattr(args, "demo", False):
        run_demo(args)
        return 0
    from ..grpo import GRPOTrainer

    run(GRPOTrainer, config)
    return 0
