"""GRPO's pieces: advantages by hand, the loss and gradients against TRL's, and the sampler."""
import datasets
import numpy as np
import pytest
import torch
from scipy import stats

from subnetscope.grpo import group_advantages, grpo_loss
from subnetscope.models import tiny_model, word_tokenizer
from subnetscope.rl import disable_dropout, per_token_logps
from subnetscope.sampling import completion_mask_after_eos, gumbel_noise


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, float("nan"), 4.0, 2.0])
    adv = group_advantages(rewards, group_size=2, clip=10.0)
    std = np.std([1.0, 3.0], ddof=1)
    assert adv[:2].tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4)], rel=1e-5)
    assert adv[2:4].tolist() == [0.0, 0.0]  # equal rewards: zero advantage, not NaN
    assert adv[4:6].tolist() == [0.0, 0.0]  # a group with one valid reward has no spread; NaN gets 0
    std = np.std([4.0, 2.0], ddof=1)
    assert adv[6].item() == pytest.approx(1 / (std + 1e-4), rel=1e-5)
    assert group_advantages(torch.tensor([0.0, 100.0]), 2, clip=0.5).tolist() == [-0.5, 0.5]


def test_completion_mask_keeps_the_first_eos():
    ids = torch.tensor([[5, 7, 9, 9], [9, 1, 2, 3], [1, 2, 3, 4]])
    assert completion_mask_after_eos(ids, eos_id=9).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_gumbel_sampling_matches_softmax():
    """Argmax of logits/T + noise over many rows is distributed as softmax(logits/T) (chi-square)."""
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    temperature = 0.8
    rows = torch.arange(40_000)
    noise = gumbel_noise(seed=3, step=7, row_ids=rows, position=2, vocab=5)
    draws = torch.argmax(logits / temperature + noise, dim=1)
    observed = torch.bincount(draws, minlength=5).numpy()
    expected = torch.softmax(logits.double() / temperature, 0).numpy() * rows.numel()
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_gumbel_noise_is_a_function_of_its_key():
    rows = torch.tensor([3, 10, 11])
    a = gumbel_noise(1, 2, rows, 0, 50)
    assert torch.equal(a[1:], gumbel_noise(1, 2, rows[1:], 0, 50))  # other rows do not matter
    assert not torch.equal(a, gumbel_noise(1, 3, rows, 0, 50))
    assert not torch.equal(a, gumbel_noise(2, 2, rows, 0, 50))
    assert not torch.equal(a, gumbel_noise(1, 2, rows, 1, 50))


def make_trl_trainer(tmp_path, kl_correction: bool):
    from trl import GRPOConfig, GRPOTrainer

    tok = word_tokenizer()
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, report_to="none", use_cpu=True, bf16=False, beta=0.04,
                      epsilon=0.2, loss_type="grpo", temperature=0.7, use_bias_correction_kl=kl_correction)
    ds = datasets.Dataset.from_dict({"prompt": ["a b c"] * 4})
    trainer = GRPOTrainer(model=str(tmp_path / "tiny"), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("kl_correction", [True, False])
def test_loss_and_gradients_equal_trl(tmp_path, kl_correction):
    """On one fixed batch, our GRPO loss and gradients equal TRL GRPOTrainer's (loss_type="grpo")."""
    trl_trainer = make_trl_trainer(tmp_path, kl_correction)
    torch.manual_seed(0)
    model = trl_trainer.model.train()
    disable_dropout(model)  # our loop always does; TRL's default keeps GPT-2's dropout
    n_prompt, n_comp, batch = 5, 6, 4
    prompt_ids = torch.randint(0, 250, (batch, n_prompt))
    completion_ids = torch.randint(0, 250, (batch, n_comp))
    completion_mask = torch.ones(batch, n_comp, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        base = per_token_logps(model, ids, mask, n_comp, 0.7)
        ref_logps = base + 0.05 * torch.randn_like(base)  # a reference and an old policy that differ
        old_logps = base + 0.3 * torch.randn_like(base)   # enough for clipping to bite
    advantages = torch.tensor([1.5, -0.7, 0.3, -1.1])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "ref_per_token_logps": ref_logps,
              "old_per_token_logps": old_logps}
    trl_loss = trl_trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logps = per_token_logps(model, ids, mask, n_comp, 0.7)
    ours, stats_ = grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, beta=0.04, epsilon=0.2,
                             kl_correction=kl_correction)
    ours.backward()
    assert stats_["clip_fraction"] > 0
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert trl_grads
    for name, grad in trl_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-5)


def test_pad_tokens_never_make_gradients_nan():
    """A random Gemma-3n's pad embedding is all zeros; AltUp's sqrt then gives NaN gradients
    wherever the pad token appears, even masked. per_token_logps must stay finite."""
    tok = word_tokenizer()
    model = tiny_model("gemma3n", vocab_size=len(tok))
    pad = model.config.pad_token_id
    assert float(model.get_input_embeddings().weight[pad].abs().sum()) == 0.0
    ids = torch.randint(2, len(tok) - 1, (2, 40))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = pad, 0       # left padding of the prompt
    ids[1, -4:], mask[1, -4:] = pad, 0     # right padding after EOS
    per_token_logps(model, ids, mask, 8, 1.0).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
