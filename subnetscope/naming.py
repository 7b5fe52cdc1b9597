"""Where a parameter sits: its tower, its transformer block and its module type, from its name alone.

Multimodal checkpoints (Gemma-3, Gemma-3n) hold a vision (and audio) tower beside the text model;
its encoder layers are named like text blocks (`vision_tower.encoder.layers.0.`), so without the
tower every text block and module type would count them. Tower weights get the module type of their
tower ("vision", "audio") and no block: per-block and per-module numbers are the text model's.
"""
from __future__ import annotations

import re

import torch

_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")
TEXT_TOWER = "text"
# the multimodal projector and embedder feed the vision tower's output into the text model: vision side
_TOWER_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?:^|\.)(?:vision_tower|vision_model|visual|embed_vision|multi_modal_projector|mm_projector)\.", "vision"),
    (r"(?:^|\.)(?:audio_tower|audio_model|embed_audio)\.", "audio"),
)
_TOWERS = tuple((re.compile(p), t) for p, t in _TOWER_PATTERNS)

# First match wins, so the more specific patterns come first.
_MODULE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"embed_tokens_per_layer|per_layer_model_projection|per_layer_projection_norm"
     r"|per_layer_input_gate|per_layer_projection|post_per_layer_input_norm", "per_layer_embedding"),
    (r"altup", "altup"),
    (r"laurel", "laurel"),
    (r"(?:^|\.)(?:ln_\w+|\w*norm\w*)\.", "norm"),
    (r"\.q_proj\.", "attn.q"),
    (r"\.k_proj\.", "attn.k"),
    (r"\.v_proj\.", "attn.v"),
    (r"\.o_proj\.|\.attn\.c_proj\.|\.out_proj\.|\.attention\.dense\.", "attn.o"),
    (r"\.c_attn\.|\.qkv_proj\.|\.query_key_value\.", "attn.qkv"),
    (r"\.gate_proj\.", "mlp.gate"),
    (r"\.up_proj\.|\.mlp\.c_fc\.|\.dense_h_to_4h\.", "mlp.up"),
    (r"\.down_proj\.|\.mlp\.c_proj\.|\.dense_4h_to_h\.", "mlp.down"),
    (r"(?:^|\.)(?:wte|wpe|embed_tokens|embed_positions|embed_in)\.", "embedding"),
    (r"(?:^|\.)(?:lm_head|embed_out)\.", "lm_head"),
    (r"(?:^|\.)(?:score|v_head|value_head)\.", "head"),
)
_COMPILED = tuple((re.compile(p), t) for p, t in _MODULE_PATTERNS)

MLP_TYPES = ("mlp.gate", "mlp.up", "mlp.down")


def tower(name: str) -> str:
    """"text", or the non-text tower of a multimodal checkpoint the weight belongs to ("vision", "audio")."""
    for pattern, kind in _TOWERS:
        if pattern.search(name):
            return kind
    return TEXT_TOWER


def block_index(name: str) -> int | None:
    """Text transformer block number (`transformer.h.N`, `model.layers.N`, `gpt_neox.layers.N`, ...), or
    None outside blocks and in a vision or audio tower."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match and tower(name) == TEXT_TOWER else None


def module_type(name: str) -> str:
    """attn.q/k/v/o/qkv, mlp.gate/up/down, norm, embedding, lm_head, altup, laurel, per_layer_embedding, head,
    vision, audio (every weight of that tower), other. GPT-2, GPT-NeoX (Pythia), Llama, Gemma-3 and Gemma-3n names."""
    kind = tower(name)
    if kind != TEXT_TOWER:
        return kind
    for pattern, kind in _COMPILED:
        if pattern.search(name):
            return kind
    return "other"


def neuron_axis(name: str, shape: tuple[int, ...]) -> int | None:
    """The axis that indexes FFN neurons of a 2-D MLP weight (HF Linear is [out, in]; GPT-2 Conv1D is [in, out])."""
    if len(shape) != 2 or not name.endswith("weight"):
        return None
    kind = module_type(name)
    if kind not in MLP_TYPES:
        return None
    conv1d = ".c_fc." in name or ".c_proj." in name
    if kind in ("mlp.gate", "mlp.up"):
        return 1 if conv1d else 0
    return 0 if conv1d else 1


ATTENTION_TYPES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv")


def head_units(name: str, shape: tuple[int, ...], head_dim: int) -> tuple[int, torch.Tensor] | None:
    """(axis, head index of each position along it) of a 2-D attention weight, or None when it has no heads
    of `head_dim` (not attention, not 2-D, a size that does not split).

    Layouts: q/k/v rows and o columns of an HF Linear ([out, in]; k/v count KV heads); GPT-2's Conv1D
    ([in, out]) c_attn columns q | k | v, each split into heads, and attn.c_proj rows; GPT-NeoX's
    query_key_value rows, head by head, each head's q, k, v together (3·head_dim rows). Phi-3's qkv_proj
    has none: its rows are all q | all k | all v with possibly fewer KV heads, which the shape alone does
    not tell apart, and read as NeoX's layout they would mix heads."""
    kind = module_type(name)
    if len(shape) != 2 or kind not in ATTENTION_TYPES or not name.endswith("weight") or head_dim < 1:
        return None
    if ".qkv_proj." in name:
        return None
    conv1d = ".c_attn." in name or ".attn.c_proj." in name
    if kind == "attn.qkv":
        axis = 1 if conv1d else 0
        size = shape[axis]
        if conv1d:  # q | k | v blocks of d columns, head h at columns h·head_dim … of each
            d = size // 3
            if size % 3 or d % head_dim:
                return None
            return axis, (torch.arange(size) % d) // head_dim
        if size % (3 * head_dim):
            return None
        return axis, torch.arange(size) // (3 * head_dim)
    if kind == "attn.o":
        axis = 0 if conv1d else 1
    else:
        axis = 0
    if shape[axis] % head_dim:
        return None
    return axis, torch.arange(shape[axis]) // head_dim
