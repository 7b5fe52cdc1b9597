"""Reproducible sampling: softmax(logits / T) drawn with the Gumbel-max trick from a counter-based hash.

The noise of row r at position t and token v is a hash of (seed, step, r, t, v), so a completion
depends on its global row id, never on batch layout or on how many processes share the batch:
one process and N data-parallel processes generate the same text. HF `generate` runs greedy over
the perturbed logits, which is exact sampling from softmax(logits / T).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash (Wellons), on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    return int(mix32(torch.tensor([x & _M32], dtype=torch.int64))[0])


def gumbel_noise(seed: int, step: int, row_ids: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise of shape (rows, vocab), a pure function of its arguments."""
    key = _mix_int(_mix_int(seed) ^ (step * 0x9E3779B1))
    rows = mix32((row_ids.long() ^ key) & _M32)
    rows = mix32(rows ^ ((position * 0x85EBCA77) & _M32))
    tokens = torch.arange(vocab, device=row_ids.device, dtype=torch.int64)
    bits = mix32(mix32(rows[:, None] ^ tokens[None, :]) ^ 0x27D4EB2F)
    uniform = (bits.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(uniform)).float()


class GumbelSampler(LogitsProcessor):
    def __init__(self, seed: int, step: int, row_ids: torch.Tensor, prompt_len: int, temperature: float):
        self.seed, self.step, self.row_ids = seed, step, row_ids
        self.prompt_len, self.temperature = prompt_len, temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        position = input_ids.shape[1] - self.prompt_len
        noise = gumbel_noise(self.seed, self.step, self.row_ids.to(scores.device), position, scores.shape[-1])
        return scores.float() / self.temperature + noise


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (B, P), left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor   # (B, C), right-padded after the first EOS
    completion_mask: torch.Tensor  # 1 up to and including the first EOS
    texts: list[str]

    def completion_token_lists(self) -> list[list[int]]:
        """Each completion's tokens up to and including its first EOS."""
        return [row[mask.bool()].tolist() for row, mask in zip(self.completion_ids, self.completion_mask)]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    is_eos = completion_ids == eos_id
    none = torch.full_like(is_eos[:, 0], completion_ids.shape[1], dtype=torch.long)  # no EOS: keep every token
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), none)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None, :]
    return (positions <= first[:, None]).long()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], row_ids: torch.Tensor, *, seed: int, step: int,
             max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
             static_cache: bool = False) -> Rollout:
    """Sample (or greedily decode) one completion per prompt; prompts repeat for a group.

    Prompts are left-padded for this call only: the tokenizer is shared (reward, classifier, saved with
    the model), so its own `padding_side` is left as it was."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(device)
    prompt_len = enc["input_ids"].shape[1]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, num_beams=1)
    if static_cache:
        config.cache_implementation = "static"
    processors = LogitsProcessorList([] if greedy else [GumbelSampler(seed, step, row_ids, prompt_len, temperature)])
    was_training = model.training
    model.eval()
    out = model.generate(**enc, generation_config=config, logits_processor=processors)
    model.train(was_training)
    completion_ids = out[:, prompt_len:]
    if completion_ids.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
        missing = max_new_tokens - completion_ids.shape[1]
        pad = completion_ids.new_full((completion_ids.shape[0], missing), tokenizer.pad_token_id)
        completion_ids = torch.cat([completion_ids, pad], dim=1)
    completion_mask = completion_mask_after_eos(completion_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    return Rollout(enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask, texts)
