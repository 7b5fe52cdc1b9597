"""LoRA adapters as the merged weights a researcher publishes: W0 + scale·B·A, one matrix at a time.

What a LoRA run changed is which entries of the merged matrices differ from W0 at the published
precision. The merge is PEFT's (`merge_and_unload`) as it runs on a CPU: the product B·A in float32
(fp16/bf16 adapters are widened first and the product cast back), transposed for fan-in-fan-out
layers (GPT-2's Conv1D), times the scale (lora_alpha / r, or / sqrt(r) with rsLoRA), added in place
to a copy of W0 in W0's dtype. The tracker (callback) and the reader of adapter folders (analysis)
both merge through `merged_weight`, so their counts agree bit for bit on a CPU; on a GPU the
product's summation order may differ in the last bit.

An adapter folder (PEFT's `save_pretrained`, TRL's `checkpoint-N` of a LoRA run) is read by
`LoraMergedSource` against its base model: tensors it does not adapt are the base's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import ScratchBuffer, TensorSource, canonical_name, read_safetensors_offsets
from .errors import SubnetscopeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def is_adapter_folder(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """scale·B·A as PEFT's `get_delta_weight` computes it on a CPU (fp32 product for fp16/bf16 adapters)."""
    dtype = b.dtype
    widen = dtype in (torch.float16, torch.bfloat16)
    if widen:
        a, b = a.float(), b.float()
    delta = b @ a
    delta = (delta.T if fan_in_fan_out else delta) * scaling
    return delta.to(dtype) if widen else delta


def merged_weight(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W0 + delta in W0's dtype, as PEFT's merge adds it (in place on a copy)."""
    merged = w0.detach().clone()
    merged += delta
    return merged


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _refuse_unsupported(config: dict, where: Path) -> None:
    """Adapters whose merge is not W0 + scale·B·A on the weight alone, refused in one line."""
    if config.get("peft_type", "LORA") != "LORA":
        raise SubnetscopeError(f"{where} is a {config.get('peft_type')} adapter: only LoRA adapters are merged here")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("alpha_pattern", "per-module alphas"),
                      ("modules_to_save", "modules_to_save")):
        if config.get(key):
            raise SubnetscopeError(f"{where} uses {what}, which this merge does not cover: merge it with PEFT's "
                                   "merge_and_unload() and pass the merged folder")


class LoraAdapter:
    """An adapter folder's A and B per adapted matrix, keyed by the base model's weight name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config_path = self.folder / ADAPTER_CONFIG
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise SubnetscopeError(f"{config_path} cannot be read ({err}): re-save the adapter") from None
        _refuse_unsupported(self.config, config_path)
        self.path = self.folder / ADAPTER_WEIGHTS
        if not self.path.is_file():
            raise SubnetscopeError(f"{self.folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: re-save the adapter "
                                   "with save_pretrained (safetensors)")
        read_safetensors_offsets(self.path)
        self.pairs: dict[str, tuple[str, str]] = {}
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
        for key in keys:
            suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise SubnetscopeError(f"{self.path} holds {key}, not a LoRA A or B matrix: merge it with PEFT's "
                                       "merge_and_unload() and pass the merged folder")
            module = key[:-len(suffix)].removeprefix(PEFT_PREFIX)
            self.pairs[canonical_name(f"{module}.weight")] = (f"{key[:-len(suffix)]}.lora_A.weight",
                                                              f"{key[:-len(suffix)]}.lora_B.weight")

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def delta(self, name: str) -> torch.Tensor:
        key_a, key_b = self.pairs[name]
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            a, b = handle.get_tensor(key_a), handle.get_tensor(key_b)
        scaling = lora_scaling(self.config["lora_alpha"], a.shape[0], bool(self.config.get("use_rslora")))
        return lora_delta(a, b, scaling, bool(self.config.get("fan_in_fan_out")))


class LoraMergedSource(TensorSource):
    """The merged model of an adapter folder and its base, one tensor at a time."""

    def __init__(self, folder: Path, base: TensorSource, label: str):
        self.label = label
        self.adapter = LoraAdapter(folder)
        self.base = base
        names = set(base.names())
        missing = [n for n in self.adapter.pairs if n not in names]
        if missing:
            raise SubnetscopeError(f"{folder} adapts {missing[0]}, which the base {base.label} lacks: pass the base "
                                   "model the adapter was trained from")

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str, scratch: ScratchBuffer | None = None) -> torch.Tensor:
        w0 = self.base.get(name)
        if name not in self.adapter.pairs:
            return w0
        delta = self.adapter.delta(name)
        if tuple(delta.shape) != tuple(w0.shape):
            raise SubnetscopeError(f"{self.adapter.folder}: the update of {name} is {tuple(delta.shape)}, the base's "
                                   f"weight {tuple(w0.shape)}: pass the base model the adapter was trained from")
        return merged_weight(w0, delta)
