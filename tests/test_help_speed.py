"""`--help` of the training commands, and a refusal of a bad flag, load no framework: torch, transformers and
TRL are imported after the flags are checked (issue 17: --help in under 2 s; issue 18: a refusal too). Checked
structurally, in a fresh interpreter, not by time."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl")
# run a script as `python SCRIPT ARGS...` does, then report its exit code and the heavy modules it loaded
PROBE = """
import json, runpy, sys
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
try:
    runpy.run_path(script, run_name="__main__")
    code = None
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize("script, flag", [("main_grpo.py", "--group_size"), ("main_ppo.py", "--ppo_epochs"),
                                          ("main_sft.py", "--dpo_beta"), ("main_prune.py", "--hold_final"),
                                          ("main_sparse_ft.py", "--lora_mode"), ("compute_masks.py", "--calib_data")])
def test_help_imports_no_framework(script, flag):
    found, out, _ = probe(script, "--help")
    assert found["code"] == 0
    assert flag in out  # the whole parser was built
    assert found["loaded"] == [], f"{script} --help imported {found['loaded']}"


@pytest.mark.parametrize("command, flag", [("build", "--lm_steps"), ("study", "--no_precision_split")])
def test_testbed_help_imports_no_framework(command, flag):
    found, out, _ = probe("testbed.py", command, "--help")
    assert found["code"] == 0 and flag in out
    assert found["loaded"] == [], f"testbed.py {command} --help imported {found['loaded']}"


def probe(script: str, *args: str) -> tuple[dict, str, str]:
    """The probe's report (exit code, heavy modules loaded) of `python SCRIPT ARGS...`, its other output and
    its stderr."""
    result = subprocess.run([sys.executable, "-c", PROBE, script, *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    *lines, report = result.stdout.strip().splitlines()
    return json.loads(report), "\n".join(lines), result.stderr


@pytest.mark.parametrize("script, args, message", [
    ("main_prune.py", ["--target_sparsity", "1.5"], "target_sparsity 1.5: must be in [0, 1)"),
    ("main_prune.py", ["--data", "no/such/text.txt"], "no/such/text.txt does not exist"),
    ("main_sparse_ft.py", ["--lora_rank", "0"], "--lora_rank 0: needs at least 1"),
    ("main_sparse_ft.py", ["--mask", "no/such/mask.safetensors"], "--mask no/such/mask.safetensors does not exist"),
    ("compute_masks.py", ["--policy", "tiny-gpt2", "--sparsity", "1.5"], "--sparsity 1.5: every sparsity"),
    ("compute_masks.py", ["--from_run", "no/such/run"], "--from_run no/such/run is not a folder"),
    ("testbed.py", ["build", "--n_embd", "33"], "--n_embd 33 is not divisible by --n_head 6"),
    ("testbed.py", ["study", "--testbed", "no/such/testbed"], "build the testbed first"),
])
def test_refusal_imports_no_framework(script, args, message):
    """A refused run exits 2 with its one-line error before torch or transformers load (each cost seconds)."""
    found, _, err = probe(script, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert found["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert found["loaded"] == [], f"{script} {' '.join(args)} imported {found['loaded']} before refusing"


def test_settings_are_reexported_where_they_were():
    """The config dataclasses and flag names moved to subnetscope.config; the old imports name the same objects."""
    from subnetscope import (
        aspg,
        baselines,
        config,
        grpo,
        models,
        ppo,
        precision,
        prune_trainer,
        rl,
        sparse_ft,
        sparse_lora,
    )

    assert rl.RunConfig is config.RunConfig and rl.RLConfig is config.RLConfig
    assert rl.OPTIMIZERS is config.OPTIMIZERS
    assert grpo.GRPOConfig is config.GRPOConfig and ppo.PPOConfig is config.PPOConfig
    assert baselines.BaselineConfig is config.BaselineConfig and baselines.SFT_DATA is config.SFT_DATA
    assert prune_trainer.PruneConfig is config.PruneConfig and sparse_ft.SparseFTConfig is config.SparseFTConfig
    assert sparse_lora.LORA_MODES is config.LORA_MODES
    assert models.TINY_MODELS is config.TINY_MODELS and models.RANDOM_SHAPED is config.RANDOM_SHAPED
    assert precision.PRECISIONS is config.PRECISIONS
    assert precision.add_precision_args is config.add_precision_args
    assert list(precision.VIEW_DTYPES) == list(config.VIEW_DTYPE_NAMES)
    for name in ("ASPG_SPARSITY", "ASPG_WARMUP", "PLAN_UPDATE_FRACTION", "PLAN_WARMUP"):
        assert getattr(aspg, name) is getattr(config, name)
