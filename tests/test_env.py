"""build_env: what the RL trainers and gradient_rank start from, built without writing anything."""
import tempfile

import torch

from subnetscope.env import build_env
from subnetscope.grpo import GRPOConfig, GRPOTrainer, first_pass_loss
from subnetscope.models import tiny_model, word_tokenizer

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


def test_first_pass_loss_is_the_trainers_first_pass(tmp_path):
    """gradient_rank differentiates first_pass_loss: it must be the loss GRPOTrainer.train_step's first pass
    computes (same prompts, completions, advantages, reference log-probs). At θ0 the first pass's loss and its
    KL term's gradient vanish whatever the batch, so both policies first move by the same offset from θ0 (the
    reference stays there): then the loss and its gradient depend on every part of the batch, the chat
    template and the temperature (not 1) included."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}watching {{ m['content'] }}{% endfor %}"
    tiny_model("gpt2", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "instruct")
    tokenizer.save_pretrained(tmp_path / "instruct")
    config = GRPOConfig(**{**TINY, "policy": str(tmp_path / "instruct"), "precision": "fp32",
                           "output_dir": str(tmp_path / "run"), "max_new_tokens": 6, "beta": 0.5, "temperature": 0.7})
    env = build_env(config)
    assert env.chat_template
    trainer = GRPOTrainer(config)
    moved = dict(trainer.policy.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in env.policy.named_parameters():
            offset = 0.05 * torch.randn(p.shape, generator=generator)
            p.add_(offset)
            moved[name].add_(offset)
    for step in (1, 2):
        batch = trainer._prepare(step)
        expected = trainer._loss(batch, None)[0]
        got = first_pass_loss(env, config, step)
        assert abs(expected.item()) > 1e-3 and float(batch["advantages"].abs().sum()) > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        grads = torch.autograd.grad(got, [p for _, p in env.policy.named_parameters()])
        want = torch.autograd.grad(expected, [moved[n] for n, _ in env.policy.named_parameters()])
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_an_earlier_bf16_accelerator_leaves_our_fp32_trainer_in_fp32(tmp_path, monkeypatch, capsys):
    """accelerate's state is one per process: a TRL trainer with bf16=True run before (here: its Accelerator)
    made `prepare` wrap our fp32 policy in bf16 autocast, and the trainer's loss moved by 0.2% (found by the
    test above, run after tests/test_callback.py). `accelerate launch --mixed_precision bf16` is warned about."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # whatever an earlier test left
    Accelerator(cpu=True, mixed_precision="bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        trainer = GRPOTrainer(GRPOConfig(**{**TINY, "precision": "fp32", "output_dir": str(tmp_path / "run")}))
        dtypes = []
        trainer.policy.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        trainer._loss(trainer._prepare(1), None)
        assert dtypes and set(dtypes) == {torch.float32}
        assert "accelerate's mixed precision (bf16) is ignored" in capsys.readouterr().err
    finally:
        AcceleratorState._reset_state()
