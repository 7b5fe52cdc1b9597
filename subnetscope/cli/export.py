"""export_checkpoint.py: a run's step checkpoint as a folder that from_pretrained loads."""
from __future__ import annotations

import argparse

from ..errors import ArgumentParser, cli_main

DESCRIPTION = """\
Write a step checkpoint as a model folder (save_pretrained layout: config, tokenizer, safetensors):
a compact step_N/ of main_grpo.py / main_ppo.py (1 bit per weight plus the changed values), a TRL
checkpoint-N/ (its compact subnet.safetensors at the judged precision when it has one), or a LoRA
adapter checkpoint, merged onto its base (W0 + scale·B·A, as merge_and_unload). The config and
tokenizer come from the run's base/ (or --base).
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step_dir", required=True, help="the step checkpoint: RUN/step_N or RUN/checkpoint-N")
    p.add_argument("--base", help="the model folder the step belongs to (default: the run's base/; for an adapter "
                                  "checkpoint outside a run, the base it was trained from)")
    p.add_argument("--output_dir", required=True, help="the new model folder (must not hold files yet)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..export import export_step

    out = export_step(args.step_dir, args.output_dir, args.base)
    print(f"{args.step_dir} written to {out} (loads with from_pretrained)")
    return 0
