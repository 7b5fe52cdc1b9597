"""PPO: GAE and rewards by hand, the value head's input, learning, checkpoints and resume."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetscope.changes import RULES, ChangeRules
from subnetscope.models import tiny_model, word_tokenizer
from subnetscope.ppo import (
    AdaptiveKLController,
    PPOConfig,
    PPOTrainer,
    gae,
    logps_and_hidden,
    masked_whiten,
    token_rewards,
)
from subnetscope.rl import per_token_logps

from .conftest import SIDE_BY_SIDE, at_once
from .test_grpo_run import offline_counts, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.4                      # last valid token: no bootstrap
    d1 = 0.0 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0])


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.25, -0.25, -0.25 - 1.0]]))


def test_whitening_and_kl_controller():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4) and w[0, 3] == 0
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=100)
    ctl.update(kl=12.0, n_samples=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    fixed = AdaptiveKLController(0.2, target=None, horizon=100)
    fixed.update(kl=50.0, n_samples=10)
    assert fixed.value == 0.2


@pytest.mark.parametrize("init", [0.05, 5.0])
def test_kl_controller_settles_where_the_kl_meets_its_target(init):
    """A policy whose KL falls as its penalty rises (kl = 3 / coefficient, so kl = 6 needs 0.5): from far below
    or far above, the controller walks the KL to the target without overshooting, and the coefficient to 0.5."""
    target = 6.0
    ctl = AdaptiveKLController(init, target=target, horizon=1000)
    gaps = []
    for _ in range(400):
        kl = 3.0 / ctl.value
        gaps.append(kl - target)
        ctl.update(kl, n_samples=64)
    assert abs(gaps[0]) > 5  # it started far from the target
    assert all(abs(b) <= abs(a) and a * b >= 0 for a, b in zip(gaps, gaps[1:]))  # closer every update, same side
    assert abs(gaps[-1]) < 0.01 * target and ctl.value == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3n"])
def test_value_head_reads_the_final_normalized_hidden_state(arch):
    tok = word_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok)).eval()  # no dropout: two forwards must agree
    ids = torch.randint(2, len(tok) - 1, (2, 9))
    mask = torch.ones_like(ids)
    logps, hidden = logps_and_hidden(model, model.get_output_embeddings(), ids, mask, 4, 1.0)
    assert hidden.shape == (2, 4, model.get_output_embeddings().in_features)
    torch.testing.assert_close(logps, per_token_logps(model, ids, mask, 4, 1.0))
    logits = model.get_output_embeddings()(hidden)  # the same state reproduces the logits
    if arch == "gemma3n":
        cap = model.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    manual = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(logps, manual, atol=1e-5, rtol=1e-5)


def ppo_config(tmp_path, **kw) -> PPOConfig:
    base = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="fp32", batch_size=16,
                mini_batch_size=8, ppo_epochs=2, lr=1e-3, init_kl_coef=0.02, target_kl=None, max_new_tokens=8,
                max_steps=30, save_every=10, eval_every=10, output_dir=str(tmp_path / "run"), no_tqdm=True)
    base.update(kw)
    return PPOConfig(**base)


def test_ppo_learns_a_simple_reward_and_tracker_equals_offline_diff(tmp_path):
    trainer = PPOTrainer(ppo_config(tmp_path))
    trainer.train()
    rewards = [m["reward/mean"] for m in read_metrics(Path(trainer.config.output_dir))]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1
    run = Path(trainer.config.output_dir)
    record = trainer.tracker.history[-1]
    offline = offline_counts(run, run / "step_30", ChangeRules(trainer.config.atol, trainer.config.eta))
    for i, name in enumerate(record.names):
        for rule in RULES:
            assert record.vs_initial[rule][i] == offline[name][rule]


def test_each_ppo_epoch_uses_every_rollout_row_once_in_minibatches(tmp_path):
    """8 rows, minibatches of 2, 3 epochs: 12 optimizer steps, and each epoch's minibatches together are the batch."""
    trainer = PPOTrainer(ppo_config(tmp_path, batch_size=8, mini_batch_size=2, ppo_epochs=3, max_steps=1))
    forwards, updates = [], []
    forward, update = trainer._logps_values, trainer._optimizer_step
    trainer._logps_values = lambda ids, mask, n: forwards.append(ids.tolist()) or forward(ids, mask, n)
    trainer._optimizer_step = lambda loss: updates.append(1) or update(loss)
    trainer.train_step(1)
    batch, minibatches = forwards[0], forwards[1:]  # the first forward scores the whole rollout batch
    assert len(batch) == 8 and [len(m) for m in minibatches] == [2] * 12 and len(updates) == 12
    for epoch in range(3):
        assert sorted(row for m in minibatches[4 * epoch:4 * epoch + 4] for row in m) == sorted(batch)


def test_resume_restores_value_head_and_kl_coefficient(tmp_path):
    first = PPOTrainer(ppo_config(tmp_path, max_steps=2, save_every=1, target_kl=1.0, init_kl_coef=0.2))
    first.train()
    head = {k: v.clone() for k, v in first.extra_modules["value_head"].state_dict().items()}
    kl_coef = first.kl_ctl.value
    assert kl_coef != 0.2  # the adaptive controller moved it
    resumed = PPOTrainer(ppo_config(tmp_path, max_steps=3, save_every=1, target_kl=1.0, init_kl_coef=0.2, resume=True))
    assert resumed.start_step == 2 and resumed.kl_ctl.value == pytest.approx(kl_coef)
    for k, v in resumed.extra_modules["value_head"].state_dict().items():
        assert torch.equal(v, head[k])


def test_main_ppo_runs_the_configs_defaults_and_flags_override_them():
    """No flag: exactly PPOConfig() (the parser adds no default of its own); each flag changes its field only."""
    from subnetscope.cli import ppo as ppo_cli
    from subnetscope.cli.training import config_from_args

    parse = ppo_cli.build_parser().parse_args
    assert config_from_args(PPOConfig, parse([])) == PPOConfig()
    cfg = config_from_args(PPOConfig, parse(["--policy", "google/gemma-3n-E2B-it", "--fixed_kl", "--no_localization",
                                             "--ppo_epochs", "3"]))
    assert cfg == dataclasses.replace(PPOConfig(), policy="google/gemma-3n-E2B-it", target_kl=None,
                                      log_localization=False, ppo_epochs=3)


@pytest.mark.slow
def test_smoke_and_bad_minibatch(tmp_path):
    def main_ppo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "main_ppo.py"), *args], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, **SIDE_BY_SIDE})

    ok, bad = at_once(lambda: main_ppo("--smoke", "--output_dir", str(tmp_path / "s"), "--no_tqdm"),
                      lambda: main_ppo("--easy", "--policy", "tiny-gpt2", "--device", "cpu", "--batch_size", "6",
                                       "--mini_batch_size", "4", "--output_dir", str(tmp_path / "b")))
    assert ok.returncode == 0, ok.stderr
    assert "changed exact" in ok.stdout and (tmp_path / "s" / "step_1" / "extra.safetensors").exists()
    assert bad.returncode == 2 and "--mini_batch_size 4 does not divide" in bad.stderr
    assert json.loads((tmp_path / "s" / "run_config.json").read_text())["settings"]["policy"] == "tiny-gemma3n"
