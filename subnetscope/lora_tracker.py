"""The update tracker for a LoRA (PEFT) run: which entries of the merged weights differ from W0.

A LoRA run trains A and B; what it publishes is the merged model W0 + scale·B·A (merge_and_unload),
at the published precision. So the tracker follows the base model's weights under their own names
(`transformer.h.0.attn.c_attn.weight`, not `...base_layer.weight` or `...lora_A.default.weight`):
an adapted matrix is merged (lora_merge.merged_weight, exactly as the analysis merges an adapter
folder), rounded to the view dtype and compared with W0 at the view, one matrix at a time, so no
more than one merged matrix exists at once; every other weight of the base model is frozen and
counts as unchanged, so fractions are of the whole model, as the analysis of the merged model
reports them.

State: the step at which each entry of an adapted matrix first changed (as UpdateTracker keeps it,
under the same `first_changed::<name>` keys, so `compute_masks.py --from_run` reads either) and a
copy of the previous step's A and B (small), from which the previous merged matrix is recomputed.
W0 is the model's own frozen base weight: no copy, except with `offload`, where the tracker works
on the CPU from a copy of W0 and the A and B it copies each step.
"""
from __future__ import annotations

import torch

from .changes import RULES, ChangeRules, changed_masks
from .errors import SubnetscopeError
from .lora_merge import lora_delta, merged_weight
from .tracker import StepCounts, UpdateTracker

PEFT_PREFIX = "base_model.model."


def is_lora_model(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules())


def base_name(peft_name: str) -> str:
    """A PEFT model's parameter name as the base model calls it."""
    name = peft_name.removeprefix("module.").removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapted layers, keyed by their base weight's name; adapters this tracker cannot merge refused."""
    layers = {}
    for module_name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
            continue
        adapters = list(module.lora_A.keys())
        if not adapters:
            continue
        if len(adapters) > 1 or getattr(module, "lora_embedding_A", None):
            raise SubnetscopeError(f"{module_name} carries {len(adapters)} adapters or an embedding adapter: the "
                                   "LoRA tracker follows one LoRA adapter on linear layers")
        adapter = adapters[0]
        if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise SubnetscopeError(f"{module_name} uses DoRA or a LoRA bias, whose merge is not W0 + scale·B·A: "
                                   "the LoRA tracker covers plain LoRA (and rsLoRA)")
        layers[base_name(f"{module_name}.weight")] = module
    return layers


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under its own names (LoRA's A and B left out); a trainable one (a
    `modules_to_save` copy, an unfrozen weight) is refused: its θ0 is not in the model."""
    params = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        if p.requires_grad:
            raise SubnetscopeError(f"the LoRA run also trains {base_name(name)} (modules_to_save or an unfrozen "
                                   "weight): the LoRA tracker follows only the adapters; freeze it, or merge and "
                                   "compare the final model with analyze_sparse_subnetwork.py")
        if ".original_module." in name:
            continue
        params[base_name(name)] = p
    return params


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (what `save_pretrained` of the base model writes) under its own names."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {base_name(k): v for k, v in inner.state_dict().items()
            if ".lora_" not in k and ".modules_to_save." not in k}


class _Adapted:
    """One adapted matrix: where its W0, A and B are, and the tracker's state for it."""

    def __init__(self, layer: torch.nn.Module, offload: bool, step_dtype: torch.dtype):
        self.adapter = next(iter(layer.lora_A.keys()))
        self.layer = layer
        self.scaling = float(layer.scaling[self.adapter])
        self.fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        w0 = layer.get_base_layer().weight.detach()
        device = torch.device("cpu") if offload else w0.device
        self.w0 = w0.to(device, copy=offload)
        self.previous = [t.detach().to(device, copy=True) for t in self.lora_weights()]
        self.first_changed = torch.full(w0.shape, -1, dtype=step_dtype, device=device)

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.lora_A[self.adapter].weight, self.layer.lora_B[self.adapter].weight

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.detach().to(self.w0.device) for t in self.lora_weights())

    def merged(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return merged_weight(self.w0, lora_delta(a, b, self.scaling, self.fan_in_fan_out))


class LoraTracker(UpdateTracker):
    """UpdateTracker's records, metrics and state for the merged weights of a PEFT LoRA model."""

    def __init__(self, model: torch.nn.Module, rules: ChangeRules = ChangeRules(), max_steps: int = 32767,
                 topk: int = 3, view_dtype: torch.dtype | None = None, offload: bool = False):
        """`view_dtype`: judge W0 and the merged weights rounded to it (None: W0's dtype). `offload`: keep the
        tracker's state and do its arithmetic on the CPU."""
        params = base_parameters(model)
        layers = lora_layers(model)
        if not layers:
            raise SubnetscopeError("the model has no LoRA layer: track it with the ordinary tracker")
        # UpdateTracker's per-name bookkeeping (blocks, modules, ...) without its buffers: the matrices are merged here
        super().__init__({n: torch.empty(0) for n in params}, rules, max_steps=max_steps, topk=topk, compile=False)
        self.params = params
        self.view_dtype = view_dtype
        self.groups = []
        step_dtype = torch.int16 if max_steps < 2**15 else torch.int32
        self.adapted = {n: _Adapted(layer, offload, step_dtype) for n, layer in layers.items()}
        self.first_changed = {n: m.first_changed for n, m in self.adapted.items()}
        self.initial = {}
        self.previous = {}

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.view_dtype) if self.view_dtype is not None else x

    def published(self, name: str) -> torch.Tensor:
        """A weight of the merged model as judged: merged (when adapted) and rounded to the view dtype."""
        if name not in self.adapted:
            return self._view(self.params[name].detach())
        matrix = self.adapted[name]
        return self._view(matrix.merged(*matrix.current()))

    @torch.no_grad()
    def update(self, step: int) -> StepCounts:
        rows: dict[str, torch.Tensor] = {}
        for name, matrix in self.adapted.items():
            a, b = matrix.current()
            current = self._view(matrix.merged(a, b))
            vs_init = changed_masks(self._view(matrix.w0), current, self.rules)
            vs_prev = changed_masks(self._view(matrix.merged(*matrix.previous)), current, self.rules)
            first = matrix.first_changed
            first.copy_(torch.where(vs_init["exact"] & (first < 0), torch.tensor(step, dtype=first.dtype), first))
            counts = [vs_init[r].sum() for r in RULES] + [vs_prev[r].sum() for r in RULES] + [(first >= 0).sum()]
            rows[name] = torch.stack(counts)
            for old, new in zip(matrix.previous, (a, b)):
                old.copy_(new)
        table = dict(zip(rows, torch.stack(list(rows.values())).cpu().tolist())) if rows else {}  # one host sync
        counts = [table.get(n, [0] * (2 * len(RULES) + 1)) for n in self.names]
        record = StepCounts(
            step=step, names=self.names, numel=[self.params[n].numel() for n in self.names],
            vs_initial={r: [c[i] for c in counts] for i, r in enumerate(RULES)},
            vs_previous={r: [c[len(RULES) + i] for c in counts] for i, r in enumerate(RULES)},
            ever_changed=[c[2 * len(RULES)] for c in counts],
        )
        self.history.append(record)
        return record

    def exact_masks(self) -> dict[str, torch.Tensor]:
        return {n: changed_masks(self._view(m.w0), self.published(n), self.rules)["exact"]
                for n, m in self.adapted.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"first_changed::{n}": m.first_changed.clone() for n, m in self.adapted.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore after the adapter was restored: the previous step's A and B are the current ones."""
        missing = [n for n in self.adapted if f"first_changed::{n}" not in state]
        if missing:
            raise SubnetscopeError(f"the checkpoint's tracker state lacks {missing[0]}: it was not written by this "
                                   "LoRA run (other target modules?); resume with the run's peft_config")
        for name, matrix in self.adapted.items():
            matrix.first_changed.copy_(state[f"first_changed::{name}"])
            for old, new in zip(matrix.previous, matrix.current()):
                old.copy_(new)
