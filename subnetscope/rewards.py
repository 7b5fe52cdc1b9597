"""Reward functions: a Hugging Face sentiment classifier, the VADER lexicon, or a toy heuristic.

Each takes the prompts, the completions (text) and the completions' token ids and returns one float per
completion. Each is also a valid TRL `reward_funcs` entry: TRL calls rewards with keywords
(`prompts=, completions=, completion_ids=, trainer_state=, ...`, plus the data set's columns), and
conversational samples (lists of {"role", "content"} messages) are scored on their text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

from .errors import SubnetscopeError
from .hub import from_hub

if TYPE_CHECKING:
    import torch

REWARDS = ("vader", "model", "easy", "arithmetic")  # arithmetic: exact match of the final number
REWARD_HINT = "use --reward vader, or pass a local classifier folder to --reward_model"


def reward_from_flags(given: dict) -> dict:
    """The reward the flags given on the command line mean: naming --reward_model selects --reward model
    (over a preset's reward too); naming it beside another --reward is a contradiction, refused."""
    if "reward_model" not in given:
        return {}
    reward = given.get("reward", "model")
    if reward != "model":
        raise SubnetscopeError(f"--reward {reward} does not use --reward_model {given['reward_model']}: pass "
                               "--reward model to score with that classifier, or leave --reward_model out")
    return {"reward": "model"}


class RewardFunction(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]]) -> list[float]:
        ...


def as_text(sample: Any) -> str:
    """A sample as text: a string as it is, a conversation (TRL's conversational format, a list of
    {"role", "content"} messages) as its messages' contents joined by newlines."""
    if isinstance(sample, str):
        return sample
    if isinstance(sample, dict):
        return str(sample.get("content", ""))
    return "\n".join(as_text(message) for message in sample)


class TextReward:
    """A reward callable both ways: `reward(prompts, completions, completion_ids)` (subnetscope's loops)
    and `reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)` (TRL's
    `reward_funcs`); the keywords TRL adds are accepted and not used."""

    name = "reward"

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        if completions is None:
            raise TypeError(f"{type(self).__name__} needs the completions")
        texts = [as_text(c) for c in completions]
        prompt_texts = [as_text(p) for p in prompts] if prompts is not None else [""] * len(texts)
        return self.score(prompt_texts, texts, completion_ids)

    def score(self, prompts: list[str], completions: list[str],
              completion_ids: Sequence[Sequence[int]] | None) -> list[float]:
        raise NotImplementedError


class VaderReward(TextReward):
    """VADER's compound sentiment score of the completion, in [-1, 1]: the offline default."""

    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, completions, completion_ids) -> list[float]:
        return [float(self._analyzer.polarity_scores(c)["compound"]) for c in completions]


class EasyReward(TextReward):
    """Fraction of generated tokens with an even id: meaningless as text, but learnable within a
    few steps by any model, random ones included, so it checks that the RL loop learns at all."""

    name = "easy"

    def score(self, prompts, completions, completion_ids) -> list[float]:
        if completion_ids is None:
            raise TypeError("EasyReward scores token ids: pass completion_ids (TRL's trainers do)")
        return [sum(1 for t in ids if t % 2 == 0) / len(ids) if len(ids) else 0.0 for ids in completion_ids]


class ClassifierReward(TextReward):
    """The POSITIVE logit of a sequence classifier (default lvwerra/distilbert-imdb) on prompt + completion."""

    name = "model"

    def __init__(self, spec: str, device: str, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = from_hub(AutoTokenizer, spec, "reward model", REWARD_HINT)
        self.model = from_hub(AutoModelForSequenceClassification, spec, "reward model", REWARD_HINT).to(device).eval()
        labels = {int(k): v for k, v in self.model.config.id2label.items()}
        positive = [i for i, label in labels.items() if label.upper() in ("POSITIVE", "POS")]
        if not positive:
            raise SubnetscopeError(
                f"reward model {spec!r} has no POSITIVE label (its labels: {sorted(labels.values())}): "
                "use a sentiment classifier with a POSITIVE class"
            )
        self.positive = positive[0]
        self.max_length = min(512, getattr(self.model.config, "max_position_embeddings", None) or 512)
        self.device = device
        self.batch_size = batch_size

    def score(self, prompts, completions, completion_ids) -> list[float]:
        import torch

        texts = [p + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length).to(self.device)
                logits = self.model(**enc).logits.float()
                scores.extend(logits[:, self.positive].tolist())
        return scores


def score_rollout(reward_fn: RewardFunction, prompts: Sequence[str], rollout) -> torch.Tensor:
    """One float32 reward per completion of `rollout`; None, NaN and inf all become NaN."""
    import torch

    values = reward_fn(prompts, rollout.texts, rollout.completion_token_lists())
    rewards = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    return torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, float("nan")))


def build_reward(kind: str, reward_model: str, device: str) -> RewardFunction:
    """A named reward (REWARDS), or `module:function` (a TRL-style reward callable, see reward_import)."""
    if ":" in kind:
        from .reward_import import import_reward

        return import_reward(kind)
    if kind == "vader":
        return VaderReward()
    if kind == "easy":
        return EasyReward()
    if kind == "model":
        return ClassifierReward(reward_model, device)
    if kind == "arithmetic":
        from .arithmetic import ArithmeticReward

        return ArithmeticReward()
    raise SubnetscopeError(f"unknown reward {kind!r}: use {', '.join(REWARDS)}")
