"""PPO with a value head and an in-loop update tracker (TRL removed its PPOTrainer in 1.13).

One update: `batch_size` prompts, one sampled completion each, the reward at the last token and a
per-token KL penalty to the frozen reference (fixed, or adapted toward `target_kl`), GAE(γ, λ)
advantages (whitened), then `ppo_epochs` passes over minibatches of the clipped policy loss plus
`vf_coef` times the clipped value loss, and the tracker's update. Defaults follow the original
experiment config: gpt2-medium, 32 prompts per update, 600 updates, checkpoints every 20,
localization logged, top-3 blocks; the change rules are the toolkit's (atol 1e-5, eta 1e-3), as for
GRPO, SFT/DPO and the analyses, so that every count compares.
"""
from __future__ import annotations

import time

import torch

from .config import PPOConfig
from .errors import SubnetscopeError
from .rewards import RewardFunction
from .rl import RLTrainer, per_token_logps
from .seeds import STEP_STRIDE, stream_seed


class ValueHead(torch.nn.Module):
    """A scalar value per position from the policy's final normalized hidden state (float32)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def logps_and_hidden(model, head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     n_completion: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probs and the hidden state before each completion token.

    The hidden state is read as the LM head's input, which is the final normalized output for every
    architecture (Gemma-3n's hidden_states are 4-D AltUp stacks; its LM head input is not).
    `model` may be the data-parallel wrapper, `head` is the unwrapped model's output embedding.
    """
    captured: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("h", args[0]))
    try:
        logps = per_token_logps(model, input_ids, attention_mask, n_completion, temperature)
    finally:
        handle.remove()
    return logps, captured["h"][:, -n_completion - 1:-1]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """−kl_coef·KL at every completion token, plus the score at the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.long().cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()
    return rewards + last * scores.unsqueeze(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over completion tokens; returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        following = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * following if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * following * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_losses(logps, old_logps, values, old_values, advantages, returns, mask, cliprange: float,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ratio = torch.exp(logps - old_logps)
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    stats = {"clip_fraction": float(masked_mean(((ratio - 1).abs() > cliprange).float(), mask)),
             "value_clip_fraction": float(masked_mean(((values - old_values).abs() > cliprange_value).float(), mask))}
    return masked_mean(pg, mask), masked_mean(vf, mask), stats


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient toward `target` over `horizon` samples."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon


class PPOTrainer(RLTrainer):
    name = "PPO"
    completions_per_prompt = 1

    def __init__(self, config: PPOConfig, reward_fn: RewardFunction | None = None):
        self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
        super().__init__(config, reward_fn)

    def check_split(self, world: int) -> None:
        super().check_split(world)
        per_rank = self.config.batch_size // world
        if per_rank % self.config.mini_batch_size:
            raise SubnetscopeError(
                f"--mini_batch_size {self.config.mini_batch_size} does not divide the {per_rank} prompts each "
                "process takes per update: choose a divisor"
            )

    def build_extra_modules(self) -> dict[str, torch.nn.Module]:
        torch.manual_seed(self.config.seed)
        return {"value_head": ValueHead(self.policy.get_output_embeddings().in_features)}

    def extra_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        state, _ = super().extra_state()
        head = self.accelerator.unwrap_model(self.extra_modules["value_head"])
        return {**state, "kl_coef": self.kl_ctl.value}, {f"value_head.{k}": v for k, v in head.state_dict().items()}

    def load_extra_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state, tensors)
        self.kl_ctl.value = float(state.get("kl_coef", self.kl_ctl.value))
        head = {k[len("value_head."):]: v for k, v in tensors.items() if k.startswith("value_head.")}
        if head:
            self.extra_modules["value_head"].load_state_dict(head)

    def _logps_values(self, ids, mask, n_comp):
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        with self.autocast():
            logps, hidden = logps_and_hidden(self.model, head, ids, mask, n_comp, self.config.temperature)
        return logps, self.extra_modules["value_head"](hidden)  # outside autocast: values stay float32

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        prompts, rollout = self._rollout(step)
        t_gen = time.perf_counter()
        scores = self._rewards(prompts, rollout)
        valid_scores = torch.nan_to_num(scores, nan=0.0).to(self.device)
        ids, mask = rollout.input_ids.to(self.device), rollout.attention_mask.to(self.device)
        scored = (~torch.isnan(scores)).float().to(self.device).unsqueeze(1)  # unscorable rows teach nothing
        comp_mask = rollout.completion_mask.to(self.device).float() * scored
        n_comp = rollout.completion_ids.shape[1]
        with torch.no_grad():
            old_logps, old_values = self._logps_values(ids, mask, n_comp)
            ref_logps = self._ref_logps(rollout)
            kl = (old_logps - ref_logps) if ref_logps is not None else torch.zeros_like(old_logps)
            rewards = token_rewards(valid_scores, kl, comp_mask, self.kl_ctl.value)
            advantages, returns = gae(rewards, old_values, comp_mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, comp_mask)
        n = ids.shape[0]
        stats: dict = {}
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, step, STEP_STRIDE))
        for _ in range(cfg.ppo_epochs):
            for batch in torch.randperm(n, generator=gen).split(cfg.mini_batch_size):
                b = batch.to(self.device)
                logps, values = self._logps_values(ids[b], mask[b], n_comp)
                pg, vf, stats = ppo_losses(logps, old_logps[b], values, old_values[b], advantages[b], returns[b],
                                           comp_mask[b], cfg.cliprange, cfg.cliprange_value)
                self._optimizer_step(pg + cfg.vf_coef * vf)
        mean_kl = float(self.accelerator.gather((kl * comp_mask).sum(1).mean().reshape(1)).mean())
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, cfg.batch_size)
        tracked, tracker_s = self._track(step)
        return {**self._common_metrics(scores, comp_mask, t0, t_gen, tracker_s),
                "loss/policy": float(pg.detach()), "loss/value": float(vf.detach()), "kl": mean_kl,
                "kl_coef": kl_coef, **stats, **tracked}
