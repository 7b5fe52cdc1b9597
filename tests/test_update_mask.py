"""Subnetwork-only RL fine-tuning (--update_mask) and the ASPG optimizer inside main_grpo.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetscope.grpo import GRPOConfig, GRPOTrainer
from subnetscope.masks import MaskSet, fingerprint_of, load_masks, save_masks

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


def grpo_config(out: Path, **kw) -> GRPOConfig:
    base = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="mixed", batch_size=4,
                group_size=2, max_new_tokens=6, lr=1e-3, weight_decay=0.1, max_steps=3, save_every=3, eval_every=3,
                output_dir=str(out), no_tqdm=True, log_localization=False)
    base.update(kw)
    return GRPOConfig(**base)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_subnetwork_only_rerun_of_a_full_run(tmp_path):
    GRPOTrainer(grpo_config(tmp_path / "full")).train()
    made = run("compute_masks.py", "--from_run", str(tmp_path / "full"), "--output_dir", str(tmp_path / "masks"))
    assert made.returncode == 0, made.stderr
    mask_path = tmp_path / "masks" / "mask_ever_changed_step3.safetensors"
    mask_set = load_masks(mask_path)
    ever = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])["changed/ever_exact"]
    assert 1 - mask_set.sparsity() == pytest.approx(ever) and 0 < ever < 1
    sub = GRPOTrainer(grpo_config(tmp_path / "sub", update_mask=str(mask_path)))
    sub.train()
    base = load_file(str(tmp_path / "full" / "base" / "model.safetensors"))
    mine, full = final_weights(tmp_path / "sub"), final_weights(tmp_path / "full")
    for name, mask in mask_set.masks.items():
        assert torch.equal(mine[name][~mask], base[name][~mask]), name
    report = json.loads((tmp_path / "sub" / "subnetwork_comparison.json").read_text())
    names = list(mask_set.masks)
    same = sum(int((mine[n] == full[n]).sum()) for n in names) / sum(mine[n].numel() for n in names)
    assert report["identical_fraction"]["exact"] == pytest.approx(same)
    assert set(report["identical_fraction"]) == {"exact", "atol", "relative"}
    for key, folder in (("subnetwork_run", "sub"), ("full_run_final", "full")):
        last = json.loads((tmp_path / folder / "metrics.jsonl").read_text().splitlines()[-1])
        assert report[key]["reward"] == last["reward/mean"]


def test_a_hand_made_mask_confines_float32_updates(tmp_path):
    from subnetscope.models import load_causal_lm, load_tokenizer

    model = load_causal_lm("tiny-gpt2", torch.float32, vocab_size=len(load_tokenizer("tiny-gpt2")))
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters()}
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks, {"method": "test"}, fingerprint_of(model)))
    GRPOTrainer(grpo_config(tmp_path / "run", precision="fp32", update_mask=str(path))).train()
    base = load_file(str(tmp_path / "run" / "base" / "model.safetensors"))
    final = final_weights(tmp_path / "run")
    moved = 0
    for name, mask in masks.items():
        if name in final:
            assert torch.equal(final[name][~mask], base[name][~mask]), name
            moved += int((final[name][mask] != base[name][mask]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for n, m in masks.items() if n in final)
    assert not (tmp_path / "run" / "subnetwork_comparison.json").exists()  # the mask names no full run


@pytest.mark.slow
def test_update_mask_of_another_model_is_one_line(tmp_path):
    from subnetscope.models import tiny_model

    other = tiny_model("gemma3n", vocab_size=64)
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in other.named_parameters()}
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks, {}, fingerprint_of(other)))
    result = run("main_grpo.py", "--policy", "tiny-gpt2", "--max_steps", "1", "--output_dir", str(tmp_path / "r"),
                 "--update_mask", str(path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "does not match the model" in lines[0], result.stderr


def test_aspg_in_grpo_changes_only_the_top_fraction_after_warmup(tmp_path):
    trainer = GRPOTrainer(grpo_config(tmp_path / "run", precision="fp32", optimizer="aspg", aspg_sparsity=0.95,
                                      aspg_warmup=2, max_steps=5, save_every=5, eval_every=5, weight_decay=0.0))
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    total = sum(p.numel() for p in trainer.params.values())
    k = round(0.05 * total)
    for r in records:
        if r["step"] <= 2:
            assert r["step_change/exact"] > 0.5
        else:
            assert 0 < r["step_change/exact"] * total <= k
            assert r["step_change/exact"] * total >= 0.99 * k  # an update rounding to no change is rare


def test_ppo_with_update_mask_keeps_the_rest_at_theta0(tmp_path):
    from subnetscope.models import load_causal_lm, load_tokenizer
    from subnetscope.ppo import PPOConfig, PPOTrainer

    model = load_causal_lm("tiny-gpt2", torch.float32, vocab_size=len(load_tokenizer("tiny-gpt2")))
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()}
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks, {"method": "test"}, fingerprint_of(model)))
    config = PPOConfig(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="fp32", batch_size=4,
                       mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, lr=1e-3, weight_decay=0.1, max_steps=2,
                       save_every=2, eval_every=2, output_dir=str(tmp_path / "run"), no_tqdm=True,
                       update_mask=str(path))
    PPOTrainer(config).train()
    base = load_file(str(tmp_path / "run" / "base" / "model.safetensors"))
    final = final_weights(tmp_path / "run")
    for name, mask in masks.items():
        if name in final:
            assert torch.equal(final[name][~mask], base[name][~mask]), name
    assert any(not torch.equal(final[n][m], base[n][m]) for n, m in masks.items() if n in final)


def test_aspg_is_refused_for_trl_baselines():
    from subnetscope.baselines import BaselineConfig
    from subnetscope.errors import SubnetscopeError

    with pytest.raises(SubnetscopeError, match="TRL's trainers here take"):
        BaselineConfig(optimizer="aspg").validate()
