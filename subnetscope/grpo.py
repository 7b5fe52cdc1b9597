"""GRPO with an in-loop update tracker: a trainer in the style of TRL (its settings: config.GRPOConfig).

One step: `batch_size` prompts, `group_size` sampled completions each, rewards, group-relative
advantages, then `inner_epochs` passes of the clipped surrogate with a k3 KL penalty to the frozen
reference (TRL's loss_type="grpo"), and the tracker's update (once per step, after the last pass).
"""
from __future__ import annotations

import time

import torch

from .config import GRPOConfig
from .data import chat_prompts
from .env import Env
from .hypotheses import advantage_stats
from .rewards import RewardFunction, score_rollout
from .rl import RLTrainer, per_token_logps, reference_logps, step_prompts
from .sampling import Rollout, generate

ADV_EPS = 1e-4  # TRL's: a group of equal rewards gets advantage 0, not NaN


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """(r − group mean) / (group std + 1e-4), clipped to ±clip; NaN rewards get advantage 0
    and are left out of their group's mean and std (unbiased std, as TRL)."""
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    count = valid.sum(1, keepdim=True).clamp(min=1)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(1, keepdim=True) / count
    squares = (torch.where(valid, grouped - mean, torch.zeros_like(grouped)) ** 2).sum(1, keepdim=True)
    var = squares / (count - 1).clamp(min=1)
    adv = (grouped - mean) / (var.sqrt() + ADV_EPS)
    adv = torch.where(valid, adv, torch.zeros_like(adv)).clamp(-clip, clip)
    return adv.view(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float, epsilon: float,
              kl_correction: bool = True) -> tuple[torch.Tensor, dict]:
    """TRL's loss_type="grpo": clipped surrogate plus β·k3 KL, token mean per sequence, then mean.

    With `kl_correction` (TRL's use_bias_correction_kl, its default) the KL term is weighted by the
    importance ratio, which keeps its gradient unbiased for samples drawn from the old policy.
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    kl = None
    if beta != 0.0 and ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * (kl * ratio if kl_correction else kl)
    mask = mask.to(per_token.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    loss = ((per_token * mask).sum(-1) / lengths).mean()
    clipped = ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).float()
    stats = {"clip_fraction": float((clipped * mask).sum() / mask.sum().clamp(min=1))}
    if kl is not None:
        stats["kl"] = float(((kl.detach() * mask).sum(-1) / lengths).mean())
    return loss, stats


def grpo_batch(rollout: Rollout, rewards: torch.Tensor, ref_logps: torch.Tensor | None, config: GRPOConfig,
               device: str) -> dict:
    """One step's rollout as the loss reads it: group-relative advantages, ids and masks on `device`."""
    return {"rollout": rollout, "rewards": rewards,
            "advantages": group_advantages(rewards, config.group_size, config.adv_clip).to(device),
            "ids": rollout.input_ids.to(device), "mask": rollout.attention_mask.to(device),
            "comp_mask": rollout.completion_mask.to(device), "n_comp": rollout.completion_ids.shape[1],
            "ref_logps": ref_logps}


def batch_loss(logps: torch.Tensor, batch: dict, old_logps: torch.Tensor | None,
               config: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """grpo_loss of `batch` at the policy's `logps` (old_logps None: the first pass, ratio 1)."""
    return grpo_loss(logps, logps.detach() if old_logps is None else old_logps, batch["ref_logps"],
                     batch["advantages"], batch["comp_mask"], config.beta, config.epsilon, config.kl_correction)


def first_pass_loss(env: Env, config: GRPOConfig, step: int) -> torch.Tensor:
    """The loss of `step`'s fresh rollout at the env's policy, as one process's first pass of
    GRPOTrainer.train_step computes it (same prompts, completions, batch and loss), without a trainer, a run
    folder or an optimizer step: what gradient studies differentiate. Rollouts come from the env's sampler
    as built (the policy at θ0, rounded), so under mixed precision this holds while the policy is at θ0."""
    prompts, rows = step_prompts(env.prompts, step, config.batch_size, config.seed, config.group_size)
    text = chat_prompts(env.tokenizer, prompts) if env.chat_template else prompts
    static = env.device.startswith("cuda") and not config.gradient_checkpointing
    rollout = generate(env.policy if env.sampler is None else env.sampler, env.tokenizer, text,
                       rows, seed=config.seed, step=step,
                       max_new_tokens=config.max_new_tokens, temperature=config.temperature, static_cache=static)
    ref = reference_logps(env.ref, env.ref_device, env.precision, rollout, config.temperature, env.device)
    batch = grpo_batch(rollout, score_rollout(env.reward_fn, prompts, rollout), ref, config, env.device)
    with env.precision.autocast(env.device):
        logps = per_token_logps(env.policy, batch["ids"], batch["mask"], batch["n_comp"], config.temperature)
    return batch_loss(logps, batch, None, config)[0]


class GRPOTrainer(RLTrainer):
    name = "GRPO"

    def __init__(self, config: GRPOConfig, reward_fn: RewardFunction | None = None):
        self.completions_per_prompt = config.group_size
        super().__init__(config, reward_fn)

    def _prepare(self, step: int) -> dict:
        """A fresh rollout for `step`, its rewards, advantages and reference log-probs."""
        prompts, rollout = self._rollout(step)
        return grpo_batch(rollout, self._rewards(prompts, rollout), self._ref_logps(rollout), self.config,
                          self.device)

    def _loss(self, batch: dict, old_logps: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        logps = self.policy_logps(self.model, batch["ids"], batch["mask"], batch["n_comp"])
        return batch_loss(logps, batch, old_logps, self.config)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        batch = self._prepare(step)
        t_gen = time.perf_counter()
        old_logps = None
        if cfg.inner_epochs > 1:
            with torch.no_grad():
                old_logps = self.policy_logps(self.model, batch["ids"], batch["mask"], batch["n_comp"])
        stats: dict = {}
        for _ in range(cfg.inner_epochs):
            loss, stats = self._loss(batch, old_logps)
            self._optimizer_step(loss)
        tracked, tracker_s = self._track(step)
        return {**self._common_metrics(batch["rewards"], batch["comp_mask"], t0, t_gen, tracker_s),
                "loss": float(loss.detach()), **stats, **advantage_stats(batch["advantages"]), **tracked}
