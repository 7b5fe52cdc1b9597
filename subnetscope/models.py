"""Model loading: Hub ids or folders, Gemma-3n's text model alone, and tiny random configs for tests."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Gemma3nForCausalLM, Gemma3nTextConfig


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
        max_position_embeddings=512,
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
