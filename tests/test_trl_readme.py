"""The README's "Using subnetscope with TRL" examples, run exactly as written: every python block in one
namespace, then every command of the bash blocks in this process (the script's main, with its argv).

They run in a scratch folder beside a link to ../shared, so `../shared/models/tiny-gpt2` and `runs/...`
resolve as they do from a checkout. Each TRL run must leave a folder the toolkit reads: base/ (θ0, the
base model for LoRA), checkpoint-1 and -2 with the tracker's state, and subnet/* in the trainer's logs;
the commands must succeed and write what they promise."""
from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetscope.checkpoint import open_checkpoint

from .conftest import SHARED, TINY_GPT2_DIR, requires_shared

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Using subnetscope with TRL"
RUNS = ["grpo", "grpo-lora", "rloo", "rloo-lora", "sft", "sft-lora", "dpo", "dpo-lora"]


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README's TRL section, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else len(text)]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def run_command(line: str) -> None:
    """`python SCRIPT.py ARGS`: the repository's script run in this process, as `python` would run it."""
    words = shlex.split(line)
    assert words[0] == "python" and words[1].endswith(".py"), line
    argv = sys.argv
    sys.argv = words[1:]
    try:
        runpy.run_path(str(REPO / words[1]), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), f"{line} exited with {done.code}"
    finally:
        sys.argv = argv


def test_the_section_has_every_trainer_with_and_without_lora():
    code = "\n".join(c for lang, c in readme_blocks() if lang == "python")
    for trainer in ("GRPOTrainer", "RLOOTrainer", "SFTTrainer", "DPOTrainer"):
        assert f"{trainer}(" in code and "peft_config=peft_config" in code
    assert all(f'"{name}"' in code for name in RUNS)


@pytest.mark.slow
@requires_shared(TINY_GPT2_DIR)
def test_readme_trl_examples_run_as_written(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(work)
    namespace: dict = {}
    commands = []
    for lang, code in readme_blocks():
        if lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)
        else:
            commands += [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    for name in RUNS:
        run = work / "runs" / name
        assert (run / "base" / "config.json").is_file(), name
        assert all((run / f"checkpoint-{s}" / "subnet_tracker.safetensors").is_file() for s in (1, 2)), name
        metrics = [json.loads(line) for line in (run / "subnet_metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2], name
        states = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        assert any("subnet/changed/exact" in entry for entry in states), name
    base = load_file(str(work / "runs" / "grpo-lora" / "base" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in base)  # the base model, not the adapter
    for line in commands:
        run_command(line)
    summary = json.loads((work / "runs" / "analysis" / "summary.json").read_text())
    assert summary["series"] and summary["pair"]
    assert (work / "runs" / "localization" / "summary.json").is_file()
    assert (work / "runs" / "pair" / "summary.json").is_file()
    assert (work / "runs" / "masks" / "mask_ever_changed_step2.safetensors").is_file()
    assert (work / "runs" / "grpo-masked" / "run_config.json").is_file()
    exported = work / "runs" / "dpo-step2"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    step = open_checkpoint(str(work / "runs" / "dpo" / "checkpoint-2"))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], step.get(n)) for n in step.names())
    assert os.path.isfile(exported / "tokenizer_config.json")
