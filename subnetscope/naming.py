"""Where a parameter sits: its transformer block and its module type, from its name alone."""
from __future__ import annotations

import re

_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")

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
    (r"\.o_proj\.|\.attn\.c_proj\.|\.out_proj\.", "attn.o"),
    (r"\.c_attn\.|\.qkv_proj\.", "attn.qkv"),
    (r"\.gate_proj\.", "mlp.gate"),
    (r"\.up_proj\.|\.mlp\.c_fc\.", "mlp.up"),
    (r"\.down_proj\.|\.mlp\.c_proj\.", "mlp.down"),
    (r"(?:^|\.)(?:wte|wpe|embed_tokens|embed_positions)\.", "embedding"),
    (r"(?:^|\.)lm_head\.", "lm_head"),
    (r"(?:^|\.)(?:score|v_head|value_head)\.", "head"),
)
_COMPILED = tuple((re.compile(p), t) for p, t in _MODULE_PATTERNS)

MLP_TYPES = ("mlp.gate", "mlp.up", "mlp.down")


def block_index(name: str) -> int | None:
    """Transformer block number (`transformer.h.N`, `model.layers.N`, ...), or None outside blocks."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def module_type(name: str) -> str:
    """attn.q/k/v/o/qkv, mlp.gate/up/down, norm, embedding, lm_head, altup, laurel, per_layer_embedding, head, other."""
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
