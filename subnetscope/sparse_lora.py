"""Sparse LoRA on PEFT: y = (W⊙M)x + (α/r)(B@A)x, merged as W' = (W + (α/r)·B@A)⊙M.

α/r is PEFT's LoRA scaling (lora_alpha / rank, `alpha` and `rank` of add_sparse_lora). Two modes.
sparse_to_dense: the adapters are dense while training and the mask is applied again at the merge.
sparse_to_sparse: the adapter's delta is masked in the forward too, y = (W⊙M)x + ((α/r)·(B@A)⊙M)x,
so the merged model is exactly sparse at every step and equals the forward. Both use
PEFT's own LoRA layers and `merge_and_unload`; only the forward of masked layers is replaced
(sparse_to_sparse) and the merged weights re-masked.
"""
from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .config import LORA_MODES
from .errors import SubnetscopeError


def _masked_delta_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA layer's forward with the adapter's delta multiplied by the layer's mask."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        delta = self.get_delta_weight(name) * self.sparse_mask  # in the base weight's layout, scaling included
        h = self.lora_dropout[name](x).to(delta.dtype)
        update = h @ delta if self.fan_in_fan_out else F.linear(h, delta)
        result = result + update.to(result.dtype)
    return result


def _masked_modules(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    found = {}
    for name in masks:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not isinstance(module, (torch.nn.Linear, Conv1D)):
            raise SubnetscopeError(f"sparse LoRA adapts linear weights only; the mask covers {name}: "
                                   "make the mask without --include embeddings/norms/lm_head")
        found[module_name] = module
    return found


def add_sparse_lora(model: torch.nn.Module, masks: dict[str, torch.Tensor], mode: str = "sparse_to_dense",
                    rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
    """Mask the base weights in place (W ← W⊙M) and wrap the masked layers with PEFT LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    if mode not in LORA_MODES:
        raise SubnetscopeError(f"--lora_mode {mode!r}: use {' or '.join(LORA_MODES)}")
    modules = _masked_modules(model, masks)
    with torch.no_grad():
        for name, module in modules.items():
            module.weight.masked_fill_(~masks[f"{name}.weight"].to(module.weight.device), 0)
    conv1d = any(isinstance(m, Conv1D) for m in modules.values())
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(modules),
                        fan_in_fan_out=conv1d)
    with warnings.catch_warnings():  # PEFT still calls a transformers method deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    for name in modules:
        layer = inner.get_submodule(name)
        layer.register_buffer("sparse_mask", masks[f"{name}.weight"].to(layer.base_layer.weight.device),
                              persistent=False)
        if mode == "sparse_to_sparse":
            layer.forward = types.MethodType(_masked_delta_forward, layer)
    return peft_model


@torch.no_grad()
def merge_sparse_lora(peft_model, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    """PEFT's merge_and_unload (W + B@A), then W' = (W + B@A)⊙M: exactly zero wherever M is."""
    model = peft_model.merge_and_unload()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device), 0)
    return model
