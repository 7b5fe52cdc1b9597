"""Issue 19's silent mistakes: ASPG in bf16 (NaN / no update), a run whose weights turn non-finite,
--reward_model without --reward model, and --update_mask leaving uncovered tensors trainable."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from subnetscope.aspg import ASPG
from subnetscope.cli import grpo as grpo_cli
from subnetscope.cli import ppo as ppo_cli
from subnetscope.cli.training import summary_line
from subnetscope.errors import SubnetscopeError
from subnetscope.grpo import GRPOConfig, GRPOTrainer
from subnetscope.masks import MaskSet, fingerprint_of, save_masks
from subnetscope.rl import check_run_start

P0 = [0.5, -0.25, 0.125, 1.0]
G = [0.1, -0.2, 0.0, 0.3]


def adam_first_step(p, g, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One bias-corrected Adam step in float64, written out by hand."""
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    m, v = (1 - beta1) * g, (1 - beta2) * g * g
    return p - lr * (m / (1 - beta1)) / (np.sqrt(v) / np.sqrt(1 - beta2) + eps)


def test_aspg_bf16_step_is_the_float64_step_rounded_once():
    p = torch.tensor(P0, dtype=torch.bfloat16, requires_grad=True)
    opt = ASPG([p], lr=1e-2, warmup=10)
    p.grad = torch.tensor(G, dtype=torch.bfloat16)
    opt.step()
    grad64 = torch.tensor(G, dtype=torch.bfloat16).double().numpy()  # the gradient the optimizer saw
    expected = torch.tensor(adam_first_step(P0, grad64, 1e-2)).to(torch.bfloat16)
    assert torch.isfinite(p).all()
    assert torch.equal(p.detach(), expected), (p, expected)
    assert p[2].item() == 0.125 and p[0].item() != 0.5  # zero gradient: unchanged; others: moved
    assert all(opt.state[p][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "residual"))


def test_aspg_bf16_state_stays_float32_through_load_state_dict():
    p = torch.tensor(P0, dtype=torch.bfloat16, requires_grad=True)
    opt = ASPG([p], lr=1e-2, warmup=10)
    p.grad = torch.tensor(G, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    q = torch.tensor(P0, dtype=torch.bfloat16, requires_grad=True)
    other = ASPG([q], lr=1e-2, warmup=10)
    other.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq", "residual", "importance"):
        assert other.state[q][key].dtype == torch.float32, key
        assert torch.equal(other.state[q][key], opt.state[p][key]), key
    assert other.state[q]["updates"].dtype == torch.int32


def grpo_config(out: Path, **kw) -> GRPOConfig:
    base = {"policy": "tiny-gpt2", "reward": "easy", "dataset": "easy", "device": "cpu", "precision": "fp32",
            "batch_size": 4, "group_size": 2, "max_new_tokens": 6, "lr": 1e-3, "weight_decay": 0.1, "max_steps": 2,
            "save_every": 1, "eval_every": 2, "output_dir": str(out), "no_tqdm": True, "log_localization": False}
    base.update(kw)
    return GRPOConfig(**base)


def test_nonfinite_weights_stop_the_run_naming_the_step_and_tensor(tmp_path):
    trainer = GRPOTrainer(grpo_config(tmp_path / "run", max_steps=3))
    target = "transformer.h.1.mlp.c_fc.weight"
    step, calls = trainer.optimizer.step, []

    def poisoned_step(*args, **kwargs):
        out = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # inner_epochs = 1: the update of step 2
            trainer.params[target].data[3, 5] = float("nan")
        return out

    trainer.optimizer.step = poisoned_step
    with pytest.raises(SubnetscopeError) as err:
        trainer.train()
    message = str(err.value)
    assert "step 2" in message and target in message and "\n" not in message
    assert "transformer.h.0" not in message  # only the poisoned tensor is named
    run = tmp_path / "run"
    assert (run / "step_1").is_dir()
    assert not (run / "step_2").exists() and not (run / "step_3").exists() and not (run / "final").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("cli", [grpo_cli, ppo_cli])
def test_naming_a_reward_model_selects_it(cli):
    config_of = grpo_cli.grpo_config if cli is grpo_cli else (
        lambda args: ppo_cli.config_from_args(ppo_cli.PPOConfig, args, ppo_cli.PRESET_EXTRA))
    assert config_of(cli.build_parser().parse_args(["--reward_model", "some/classifier"])).reward == "model"
    smoke = config_of(cli.build_parser().parse_args(["--smoke", "--reward_model", "some/classifier"]))
    assert smoke.reward == "model" and smoke.reward_model == "some/classifier"  # over the preset's vader
    assert config_of(cli.build_parser().parse_args([])).reward == "vader"
    assert config_of(cli.build_parser().parse_args(["--reward", "easy"])).reward == "easy"


@pytest.mark.parametrize("reward", ["vader", "easy"])
def test_a_reward_model_beside_another_reward_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, reward):
    from subnetscope import rewards

    def no_loading(*args, **kwargs):
        raise AssertionError("the reward model was loaded")

    monkeypatch.setattr(rewards.ClassifierReward, "__init__", no_loading)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        grpo_cli.main(["--reward", reward, "--reward_model", "some/classifier", "--output_dir", str(out),
                       "--max_steps", "1"])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in lines[0], lines
    assert f"--reward {reward}" in lines[0] and "--reward_model" in lines[0]
    assert not out.exists()


def partial_mask(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, int]]:
    """A mask over two weight matrices only (30% ones); the model's parameter sizes by name."""
    from subnetscope.models import load_causal_lm, load_tokenizer

    model = load_causal_lm("tiny-gpt2", torch.float32, vocab_size=len(load_tokenizer("tiny-gpt2")))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    covered = ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight")
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters() if n in covered}
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks, {"method": "test"}, fingerprint_of(model)))
    return path, masks, sizes


def run_with_mask(run: Path, path: Path, **kw) -> tuple[dict, dict, dict]:
    GRPOTrainer(grpo_config(run, update_mask=str(path), **kw)).train()
    base = load_file(str(run / "base" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    return base, final, json.loads((run / "run_config.json").read_text())["settings"]


def test_update_mask_holds_uncovered_tensors_at_theta0(tmp_path):
    path, masks, _ = partial_mask(tmp_path)
    base, final, settings = run_with_mask(tmp_path / "run", path, precision="mixed")
    uncovered = [n for n in final if n not in masks]
    assert "transformer.wte.weight" in uncovered and "transformer.ln_f.bias" in uncovered
    for name in uncovered:
        assert torch.equal(final[name], base[name]), name
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], base[name][~mask]), name
        assert not torch.equal(final[name][mask], base[name][mask]), name
    ones = sum(int(m.sum()) for m in masks.values())
    assert settings["trainable_weights"] == ones and settings["train_unmasked"] is False
    with pytest.raises(SubnetscopeError, match="--train_unmasked"):  # a measured setting: refused on resume
        check_run_start(grpo_config(tmp_path / "run", update_mask=str(path), precision="mixed", resume=True,
                                    max_steps=4, train_unmasked=True), "GRPO")


def test_train_unmasked_trains_them_and_counts_them(tmp_path):
    path, masks, sizes = partial_mask(tmp_path)
    base, final, settings = run_with_mask(tmp_path / "run", path, train_unmasked=True)
    assert not torch.equal(final["transformer.wte.weight"], base["transformer.wte.weight"])
    assert not torch.equal(final["transformer.h.0.ln_1.bias"], base["transformer.h.0.ln_1.bias"])
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], base[name][~mask]), name
    expected = sum(int(m.sum()) for m in masks.values()) + sum(s for n, s in sizes.items() if n not in masks)
    assert settings["trainable_weights"] == expected and settings["train_unmasked"] is True


def test_train_unmasked_without_a_mask_is_refused(tmp_path):
    with pytest.raises(SubnetscopeError, match="--train_unmasked only applies with --update_mask"):
        grpo_config(tmp_path / "run", train_unmasked=True).validate()


def test_summary_line_names_the_trainable_weights():
    metrics = {"step": 2, "changed/exact": 0.25, "changed/atol": 0.2, "changed/relative": 0.1, "reward/mean": 0.5}
    assert "of 1,000 weights (250 trainable);" in summary_line(metrics, 1000, "r", 250)
    assert "of 1,000 weights;" in summary_line(metrics, 1000, "r", 1000)


def test_a_mask_run_from_before_train_unmasked_keeps_training_them_on_resume():
    from subnetscope.runstate import settings_changes

    old = {"update_mask": "m.safetensors", "lr": 1e-5}  # run_config.json written before the flag existed
    assert settings_changes(old, {"update_mask": "m.safetensors", "lr": 1e-5, "train_unmasked": False}) == [
        ("train_unmasked", True, False)]
    assert settings_changes(old, {"update_mask": "m.safetensors", "lr": 1e-5, "train_unmasked": True}) == []
    assert settings_changes({"lr": 1e-5}, {"lr": 1e-5, "train_unmasked": False}) == []


def test_sft_naming_a_reward_model_selects_it():
    from subnetscope.cli.sft import build_parser, config_from_args

    parse = build_parser().parse_args
    config = config_from_args(parse(["--task", "dpo", "--reward_model", "some/classifier"]))
    assert (config.reward, config.reward_model) == ("model", "some/classifier")
    assert config_from_args(parse([])).reward == "vader"
    with pytest.raises(SubnetscopeError, match="--reward vader does not use --reward_model"):
        config_from_args(parse(["--reward", "vader", "--reward_model", "x"]))


def test_the_finite_check_skips_empty_tensors():
    from subnetscope.rl import RLTrainer

    trainer = RLTrainer.__new__(RLTrainer)  # only the parameters matter to the check
    trainer.params = {"empty": torch.zeros(0), "w": torch.ones(3)}
    trainer._check_finite(1)
    trainer.params["w"][1] = float("nan")
    with pytest.raises(SubnetscopeError, match="step 1: the weights became NaN or inf in w;"):
        trainer._check_finite(1)
