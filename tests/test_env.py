"""build_env: what the RL trainers and gradient_rank start from, built without writing anything."""
import tempfile

import torch

from subnetscope.env import build_env
from subnetscope.grpo import GRPOConfig, GRPOTrainer
from subnetscope.models import word_tokenizer

TINY = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", batch_size=4, group_size=2)


def test_build_env_writes_nothing(tmp_path, monkeypatch):
    """Before, gradient_rank built a GRPOTrainer: a run folder with θ0 in it (under a temporary folder)."""
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)  # GRPOConfig's output_dir, checkpoints/grpo, is relative to it
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    env = build_env(GRPOConfig(**TINY))
    assert env.ref is not None and env.prompts and env.eval_prompts
    assert list(work.iterdir()) == [] and list(temp.iterdir()) == []


def test_build_env_policy_is_what_grpo_trains_from(tiny_gpt2_pair, tmp_path):
    base, _, _, saved = tiny_gpt2_pair
    word_tokenizer().save_pretrained(base)
    config = GRPOConfig(**{**TINY, "policy": str(base), "precision": "fp32", "output_dir": str(tmp_path / "run")})
    env = build_env(config)
    trainer = GRPOTrainer(config)
    trained_from = dict(trainer.policy.named_parameters())
    built = dict(env.policy.named_parameters())
    assert env.policy is not trainer.policy and built.keys() == trained_from.keys()
    for name, p in built.items():
        assert p.dtype == torch.float32 and torch.equal(p, trained_from[name]), name
    state = env.policy.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in saved.items())  # the fixture's bf16 θ0, exactly
    assert (env.prompts, env.eval_prompts) == (trainer.prompts, trainer.eval_prompts)
