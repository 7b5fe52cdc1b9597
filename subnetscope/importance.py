"""Importance scores of weights and the masks they select: which weights to keep at a given sparsity.

Scores: magnitude |W|, gradient |∇W| summed over calibration batches, first-order Taylor |W·∇W|,
and Wanda's |W_ij|·‖x_j‖ (input-feature norms from forward hooks). Methods: unstructured (compared
per matrix, per output row as Wanda does, or globally), structured (MLP neurons across
up/gate/down or c_fc/c_proj, attention heads), random (the baseline) and N:M. Global selection
never concatenates the model: an exact radix select over the scores' float32 bit patterns needs
two histogram passes, one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from .config import IMPORTANCES, MASK_EXTRA_TENSORS, MASK_GROUPS
from .errors import SubnetscopeError
from .naming import block_index, head_units, module_type, neuron_axis
from .pruning import prunable_weights


@dataclass(frozen=True)
class Prunable:
    """A tensor that may be masked; `in_axis` indexes its input features (None outside linear layers)."""

    param: torch.nn.Parameter
    in_axis: int | None


def prunable_tensors(model: torch.nn.Module, include: tuple[str, ...] = ()) -> dict[str, Prunable]:
    """Linear weights (GPT-2's Conv1D included), plus embeddings, norm weights or an untied lm_head
    when `include` names them."""
    unknown = set(include) - set(MASK_EXTRA_TENSORS)
    if unknown:
        raise SubnetscopeError(f"--include {' '.join(sorted(unknown))}: choose from "
                               f"{', '.join(MASK_EXTRA_TENSORS)}")
    modules = dict(model.named_modules())
    found = {}
    for name, p in prunable_weights(model).items():
        found[name] = Prunable(p, 0 if isinstance(modules[name.rsplit(".", 1)[0]], Conv1D) else 1)
    params = dict(model.named_parameters())
    if "lm_head" in include:
        head = getattr(model, "lm_head", None)
        if head is None:
            raise SubnetscopeError("--include lm_head: this model has no lm_head")
        name = next((n for n, p in params.items() if p is head.weight), None)
        if name != "lm_head.weight":
            raise SubnetscopeError(f"--include lm_head: the LM head is tied to {name}; use --include embeddings")
        found[name] = Prunable(head.weight, 1)
    for name, p in params.items():
        kind = module_type(name)
        if ("embeddings" in include and kind in ("embedding", "per_layer_embedding") and p.dim() == 2
                and isinstance(modules.get(name.rsplit(".", 1)[0]), torch.nn.Embedding)):
            found[name] = Prunable(p, None)
        if "norms" in include and kind == "norm" and name.endswith("weight"):
            found[name] = Prunable(p, None)
    return found


# ---- scores ---------------------------------------------------------------------------------

def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def gradient_scores(model: torch.nn.Module, tensors: dict[str, Prunable], batches: list[torch.Tensor],
                    taylor: bool) -> dict[str, torch.Tensor]:
    """Σ_batches |∇W| (or |W·∇W| with `taylor`): per-batch magnitudes, so opposite signs do not cancel."""
    device = next(model.parameters()).device
    scores = {n: torch.zeros(t.param.shape, dtype=torch.float32, device=t.param.device) for n, t in tensors.items()}
    was_training = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _loss(model, batch.to(device)).backward()
        with torch.no_grad():
            for name, t in tensors.items():
                if t.param.grad is not None:
                    g = t.param.grad.float()
                    scores[name] += (g * t.param.float()).abs() if taylor else g.abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


@torch.no_grad()
def wanda_scores(model: torch.nn.Module, tensors: dict[str, Prunable],
                 batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """|W_ij|·‖x_j‖₂, with ‖x_j‖ the norm of input feature j over every calibration token."""
    not_linear = [n for n, t in tensors.items() if t.in_axis is None]
    if not_linear:
        raise SubnetscopeError(f"--importance wanda needs layer inputs, which {not_linear[0]} has not: "
                               "drop --include embeddings/norms or use another --importance")
    modules = dict(model.named_modules())
    sq_norms: dict[str, torch.Tensor] = {}
    hooks = []
    for name in tensors:
        def hook(module, args, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq_norms[name] = sq_norms.get(name, 0) + x.square().sum(0)
        hooks.append(modules[name.rsplit(".", 1)[0]].register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    scores = {}
    for name, t in tensors.items():
        norms = sq_norms[name].sqrt()
        shape = [1, 1]
        shape[t.in_axis] = -1
        scores[name] = t.param.detach().float().abs() * norms.view(shape)
    return scores


def importance_scores(model: torch.nn.Module, tensors: dict[str, Prunable], importance: str,
                      batches: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Float32 scores, one per tensor; higher = more important."""
    if importance not in IMPORTANCES:
        raise SubnetscopeError(f"--importance {importance!r}: use {', '.join(IMPORTANCES)}")
    if importance == "magnitude":
        return {n: t.param.detach().float().abs() for n, t in tensors.items()}
    if not batches:
        raise SubnetscopeError(f"--importance {importance} needs calibration data: pass --calib_data "
                               "(a data set name or a local text/jsonl file) and --calib_batches >= 1")
    if importance == "wanda":
        return wanda_scores(model, tensors, batches)
    return gradient_scores(model, tensors, batches, taylor=importance == "taylor")


def random_scores(tensors: dict[str, Prunable], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.param.shape, generator=gen).to(t.param.device) for n, t in tensors.items()}


# ---- exact global selection -------------------------------------------------------------------

def _bits(t: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as int32 bit patterns, which sort like the values."""
    return t.detach().float().clamp(min=0).nan_to_num(0.0).contiguous().view(torch.int32).reshape(-1)


def _histogram(parts) -> torch.Tensor:
    """Sum of per-tensor counts, added on each tensor's device and brought to the host once per
    device (not once per tensor: ASPG selects every optimizer step)."""
    per_device: dict[torch.device, torch.Tensor] = {}
    for counts in parts:
        per_device[counts.device] = per_device[counts.device] + counts if counts.device in per_device else counts
    return sum(c.cpu() for c in per_device.values())


def kth_smallest(tensors: list[torch.Tensor], k: int) -> float:
    """The k-th smallest (1-based) of all entries of non-negative tensors, exactly, in two
    histogram passes over the high and low 16 bits (radix select)."""
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    high = _histogram(torch.bincount(_bits(t) >> 16, minlength=1 << 15) for t in tensors)
    cum = high.cumsum(0)
    top = int(torch.searchsorted(cum, torch.tensor(k)))
    rank = k - (int(cum[top - 1]) if top else 0)
    low = _histogram(torch.bincount(b[(b >> 16) == top] & 0xFFFF, minlength=1 << 16) for b in map(_bits, tensors))
    bottom = int(torch.searchsorted(low.cumsum(0), torch.tensor(rank)))
    return torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32).item()


def smallest_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks of exactly the k smallest scores over all tensors (ties broken in tensor order)."""
    if k <= 0:
        return {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}
    threshold = kth_smallest(list(scores.values()), k)
    below = {n: s.float() < threshold for n, s in scores.items()}
    need = k - int(_histogram(b.sum().reshape(1) for b in below.values()))
    out = {}
    for name, s in scores.items():
        pick = below[name]
        if need > 0:
            ties = (s.float() == threshold).reshape(-1)
            take = ties & (ties.cumsum(0) <= need)
            need -= int(take.sum())
            pick = pick | take.view(s.shape)
        out[name] = pick
    return out


# ---- masks ------------------------------------------------------------------------------------

def _prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask with the k smallest entries of `scores` removed."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return keep.view(scores.shape)


def _rowwise(scores: torch.Tensor, in_axis: int | None, sparsity: float) -> torch.Tensor:
    """Per output row (Wanda's comparison group): each row loses round(s·row length) entries."""
    if scores.dim() < 2 or in_axis is None:
        return _prune_smallest(scores, round(sparsity * scores.numel()))
    rows = scores.movedim(in_axis, -1)
    k = round(sparsity * rows.shape[-1])
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, torch.topk(rows, k, dim=-1, largest=False).indices, False)
    return keep.movedim(-1, in_axis)


def nm_masks(scores: dict[str, torch.Tensor], tensors: dict[str, Prunable], n: int, m: int) -> dict[str, torch.Tensor]:
    """Keep the n highest scores in every group of m consecutive input features (2:4, 4:8)."""
    if not 0 < n < m:
        raise SubnetscopeError(f"--nm {n}:{m}: need 0 < N < M")
    bad = [f"{name} ({s.shape[t.in_axis if t.in_axis is not None else -1]})" for name, s in scores.items()
           for t in [tensors[name]] if s.shape[t.in_axis if t.in_axis is not None else -1] % m]
    if bad:
        raise SubnetscopeError(f"--nm {n}:{m}: input size not divisible by {m} in {', '.join(bad[:5])}")
    out = {}
    for name, s in scores.items():
        axis = tensors[name].in_axis if tensors[name].in_axis is not None else s.dim() - 1
        rows = s.movedim(axis, -1)
        groups = rows.reshape(*rows.shape[:-1], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
        out[name] = keep.reshape(rows.shape).movedim(-1, axis)
    return out


@dataclass
class UnitGroup:
    """Structural units of one layer (its MLP neurons or attention heads) and where each tensor
    holds them: `members` maps tensor name -> (axis, unit index of each position along it)."""

    label: str
    n_units: int
    members: dict[str, tuple[int, torch.Tensor]]


def _attention_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(number of query heads, head width) from the (text) config: head_dim where the config sets it
    (Gemma's differs from hidden / heads), else hidden size over heads."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "n_head", None) or getattr(config, "num_attention_heads", None)
    if not heads:
        raise SubnetscopeError("structured pruning needs the number of attention heads, which the model config lacks")
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        hidden = getattr(config, "n_embd", None) or getattr(config, "hidden_size", None)
        if not hidden or hidden % heads:
            raise SubnetscopeError("structured pruning needs the attention head width: the model config has no "
                                   "head_dim and its hidden size does not split into its heads")
        head_dim = hidden // heads
    return int(heads), int(head_dim)


def _head_layout(name: str, shape: tuple[int, ...], heads: int, head_dim: int) -> tuple[int, torch.Tensor]:
    """(axis, head of each position) of a query, fused q/k/v or output weight, checked against the config's
    head count so a layout naming.head_units does not know fails loudly instead of pruning wrong slices."""
    layout = head_units(name, shape, head_dim)
    if layout is None or int(layout[1].max()) + 1 != heads:
        raise SubnetscopeError(f"structured pruning: {name} {list(shape)} does not split into the config's "
                               f"{heads} heads of {head_dim}; use --method unstructured for this model")
    return layout


def unit_groups(model: torch.nn.Module, tensors: dict[str, Prunable]) -> list[UnitGroup]:
    """MLP neurons (rows/columns of up, gate and down consistently) and attention heads (query
    slices, each head's q, k, v of a fused projection, and the output projection's matching inputs;
    separate, possibly shared K/V heads are left alone)."""
    heads, head_dim = _attention_shape(model)
    groups: dict[str, UnitGroup] = {}
    for name, t in tensors.items():
        shape = tuple(t.param.shape)
        layer = f"layer {block_index(name)}"
        axis = neuron_axis(name, shape)
        if axis is not None:
            group = groups.setdefault(f"{layer} mlp", UnitGroup(f"{layer} mlp", shape[axis], {}))
            group.members[name] = (axis, torch.arange(shape[axis]))
            continue
        if module_type(name) not in ("attn.qkv", "attn.q", "attn.o") or len(shape) != 2:
            continue
        group = groups.setdefault(f"{layer} attn", UnitGroup(f"{layer} attn", heads, {}))
        group.members[name] = _head_layout(name, shape, heads, head_dim)
    return list(groups.values())


def structured_masks(scores: dict[str, torch.Tensor], groups: list[UnitGroup],
                     sparsity: float) -> dict[str, torch.Tensor]:
    """In every group, the round(s·units) units of lowest summed score lose all their weights;
    tensors outside any group keep everything."""
    out = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    for group in groups:
        unit_score = torch.zeros(group.n_units, dtype=torch.float64)
        for name, (axis, units) in group.members.items():
            along = scores[name].double().sum(dim=1 - axis).cpu()
            unit_score += torch.bincount(units, weights=along, minlength=group.n_units)
        k = round(sparsity * group.n_units)
        keep_unit = _prune_smallest(unit_score, k)
        for name, (axis, units) in group.members.items():
            shape = [1, 1]
            shape[axis] = -1
            out[name] = keep_unit[units].view(shape).expand_as(scores[name]).to(scores[name].device).clone()
    return out


def select_masks(scores: dict[str, torch.Tensor], tensors: dict[str, Prunable], sparsity: float, method: str,
                 group: str = "matrix", units: list[UnitGroup] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks at `sparsity` (fraction removed) for the unstructured, random and structured methods."""
    if not 0.0 <= sparsity < 1.0:
        raise SubnetscopeError(f"--sparsity {sparsity}: must be in [0, 1)")
    if method == "structured":
        return structured_masks(scores, units or [], sparsity)
    if group == "matrix":
        return {n: _prune_smallest(s, round(sparsity * s.numel())) for n, s in scores.items()}
    if group == "row":
        return {n: _rowwise(s, tensors[n].in_axis, sparsity) for n, s in scores.items()}
    if group == "global":
        total = sum(s.numel() for s in scores.values())
        pruned = smallest_global(scores, round(sparsity * total))
        return {n: ~p for n, p in pruned.items()}
    raise SubnetscopeError(f"--group {group!r}: use {', '.join(MASK_GROUPS)}")


def expected_pruned(tensors: dict[str, Prunable], sparsity: float, method: str, group: str,
                    units: list[UnitGroup] | None, nm: tuple[int, int] | None) -> dict[str, int | None]:
    """How many entries of each tensor the method should remove (None where only the total is fixed)."""
    out: dict[str, int | None] = {}
    for name, t in tensors.items():
        numel = t.param.numel()
        if method == "nm" and nm:
            out[name] = numel - numel * nm[0] // nm[1]
        elif method == "structured":
            out[name] = 0
        elif group == "global":
            out[name] = None
        elif group == "row" and t.in_axis is not None and t.param.dim() == 2:
            row = t.param.shape[t.in_axis]
            out[name] = (numel // row) * round(sparsity * row)
        else:
            out[name] = round(sparsity * numel)
    if method == "structured":  # every unit holds as many positions of a tensor as any other
        for g in units or []:
            k = round(sparsity * g.n_units)
            for name in g.members:
                out[name] = tensors[name].param.numel() * k // g.n_units
    return out
