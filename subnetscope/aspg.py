"""ASPG, adaptive sparse policy gradients, in two variants, and a DDP communication hook that sends only
the top-k gradient entries.

Both variants keep a float32 EMA of |grad| per entry (importance, beta 0.9 as in the research plan), take
`warmup` dense steps, and afterwards update exactly k entries chosen across all tensors by importance (the
exact radix select that global pruning masks use; ties broken in tensor order). They differ in what k
means and in the step:

- `ASPG` (`--optimizer aspg`): k = round((1 - sparsity) · entries), `sparsity` = the share of entries NOT
  updated (default 0.9, warm-up 10). The step is AdamW's, whose moments and bias corrections advance per
  entry only when the entry is updated; the gradient of every other entry is carried forward (error
  feedback) and added to its next gradient, so no gradient mass is lost.
- `PlanASPG` (`--optimizer aspg_plan`): the research plan's ASPG. k = int(update_fraction · entries) (at
  least 1), `update_fraction` = the share of entries updated (default 0.01, warm-up 100), and the step is
  the plan's plain one, w ← w − lr·grad on the chosen entries; the other gradients are dropped (no error
  feedback, no moments, no weight decay). Where the plan's sketch takes every entry whose importance ties
  the k-th largest, this takes exactly k.

Each keeps its state and arithmetic in float32 whatever the weights' dtype: in bf16, beta2 = 0.999 rounds
to 1, so AdamW's bias correction 1 - beta2**t would be 0 (no update, or 0/0 = NaN for a zero gradient). A
bf16 weight receives the float32 result rounded once, at the end; an entry not updated keeps its bits.

`report()` gives, since its last call, the share of entries updated per step, the optimizer state's bytes
and the FLOPs a sparse update kernel would skip per step, estimated as (entries not updated) x (FLOPs of
one entry's update): `ASPG.UPDATE_FLOPS` = 20 (moments 3 + 4, bias corrections 2 + 2, denominator 4,
weight decay and step 5; the error-feedback add is still done for a skipped entry), `PlanASPG.UPDATE_FLOPS`
= 2 (multiply, subtract). The importance EMA and the backward pass stay dense (the importance needs every
gradient), so forward and backward FLOPs, about 6 per weight per token, are not reduced: against them the
saving is at most UPDATE_FLOPS / (6 · tokens per step) of a training step. This implementation computes
the update densely and selects with `torch.where`: the figure is what a sparse kernel could skip, not
time saved here.
"""

import math

import torch
import torch.distributed as dist

from .config import ASPG_SPARSITY, ASPG_WARMUP, PLAN_UPDATE_FRACTION, PLAN_WARMUP
from .importance import smallest_global


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, buffers, step counts)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


class _TopKImportance(torch.optim.Optimizer):
    """What both variants share: importance EMA, dense warm-up, exactly-k global selection, report."""

    FLOAT_STATE: tuple[str, ...] = ("importance",)
    INT_STATE: tuple[str, ...] = ()
    UPDATE_FLOPS = 0

    def __init__(self, params, defaults: dict, warmup: int, importance_beta: float):
        if warmup < 0 or not 0.0 <= importance_beta < 1.0:
            raise ValueError("warmup must be >= 0 and importance_beta in [0, 1)")
        super().__init__(params, defaults)
        self.warmup = warmup
        self.importance_beta = importance_beta
        self._updated: torch.Tensor | int = 0
        self._updated_sum: torch.Tensor | int = 0
        self._entries_sum = 0
        self._steps = 0

    @property
    def last_updated(self) -> int:
        """Entries the last step updated (read on demand: no host sync inside step())."""
        return int(self._updated)

    def _keep(self, total: int) -> int:
        """How many of `total` entries a sparse step updates."""
        raise NotImplementedError

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.long)
            for key in self.FLOAT_STATE:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            for key in self.INT_STATE:
                state[key] = torch.zeros_like(p, dtype=torch.int32)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every restored state tensor to its parameter's dtype; the float32 state and the int32
        update counts must keep theirs (a bf16 model's counts would stop at 256). Each is a copy: the state
        is updated in place and must not be shared with `state_dict`'s owner."""
        keep = ("step", *self.FLOAT_STATE, *self.INT_STATE)
        kept = {i: {k: v for k, v in st.items() if k in keep} for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, values in kept.items():
            for key, value in values.items():
                self.state[params[i]][key] = value.to(params[i].device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries, selection = self._begin()
        updated = 0
        for i, (p, group) in enumerate(entries):
            updated = updated + self._update(p, group, None if selection is None else selection[i])
        if entries:
            self._count(entries, updated)
        return loss

    def _update(self, p: torch.Tensor, group: dict, chosen: torch.Tensor | None):
        """Step one parameter (all of it when `chosen` is None: warm-up); returns how many entries moved."""
        raise NotImplementedError

    def _begin(self) -> tuple[list[tuple[torch.Tensor, dict]], dict[int, torch.Tensor] | None]:
        """(parameter, group) of every entry with a gradient, their importance advanced, and this step's
        selection per parameter position (None: all, the warm-up)."""
        entries = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in entries:
            state = self._state(p)
            state["step"] += 1
            state["importance"].mul_(self.importance_beta).add_(p.grad.float().abs(), alpha=1 - self.importance_beta)
        if not entries or int(self.state[entries[0][0]]["step"]) <= self.warmup:
            return entries, None
        scores = {str(i): self.state[p]["importance"] for i, (p, _) in enumerate(entries)}
        total = sum(s.numel() for s in scores.values())
        keep = self._keep(total)
        if keep >= total:
            return entries, None
        dropped = smallest_global(scores, total - keep)
        return entries, {int(i): ~d for i, d in dropped.items()}

    def _count(self, entries: list, updated: torch.Tensor | int) -> None:
        self._updated = updated
        self._updated_sum = self._updated_sum + updated
        self._entries_sum += sum(p.numel() for p, _ in entries)
        self._steps += 1

    def report(self) -> dict[str, float]:
        """Since the last report: the share of entries each step updated, the update FLOPs a sparse kernel
        would have skipped per step (estimated: module docstring), and the state's bytes now."""
        out = {"aspg/state_bytes": float(state_bytes(self))}
        if self._steps:
            updated = float(self._updated_sum)
            out["aspg/updated_share"] = updated / self._entries_sum
            out["aspg/update_flops_saved"] = (self._entries_sum - updated) * self.UPDATE_FLOPS / self._steps
        self._updated_sum, self._entries_sum, self._steps = 0, 0, 0
        return out


class ASPG(_TopKImportance):
    """AdamW updating only the global top (1 - sparsity) of entries by importance, with error feedback."""

    FLOAT_STATE = ("exp_avg", "exp_avg_sq", "importance", "residual")
    INT_STATE = ("updates",)
    UPDATE_FLOPS = 20

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sparsity: float = ASPG_SPARSITY, warmup: int = ASPG_WARMUP,
                 importance_beta: float = 0.9):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, warmup,
                         importance_beta)
        self.sparsity = sparsity

    def _keep(self, total: int) -> int:
        return max(1, round((1.0 - self.sparsity) * total))

    def _update(self, p: torch.Tensor, group: dict, chosen: torch.Tensor | None):
        chosen = torch.ones_like(p, dtype=torch.bool) if chosen is None else chosen
        state = self.state[p]
        grad = p.grad.float() + state["residual"]
        beta1, beta2 = group["betas"]
        state["residual"] = torch.where(chosen, torch.zeros_like(grad), grad)
        state["updates"] += chosen.to(torch.int32)
        exp_avg = torch.where(chosen, torch.lerp(state["exp_avg"], grad, 1 - beta1), state["exp_avg"])
        exp_avg_sq = torch.where(chosen, state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad,
                                 state["exp_avg_sq"])
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
        count = state["updates"].clamp(min=1).to(torch.float32)
        bias1 = 1 - torch.pow(beta1, count)
        bias2 = 1 - torch.pow(beta2, count)
        denom = exp_avg_sq.sqrt() / bias2.sqrt() + group["eps"]
        weights = p.float()
        new = weights * (1 - group["lr"] * group["weight_decay"]) - group["lr"] / bias1 * exp_avg / denom
        p.copy_(torch.where(chosen, new, weights))
        return chosen.sum()


class PlanASPG(_TopKImportance):
    """The research plan's ASPG: w ← w − lr·grad on the global top `update_fraction` of entries by
    importance after `warmup` dense steps; the other gradients are dropped (no error feedback)."""

    UPDATE_FLOPS = 2

    def __init__(self, params, lr: float = 1e-5, update_fraction: float = PLAN_UPDATE_FRACTION,
                 warmup: int = PLAN_WARMUP, importance_beta: float = 0.9):
        if not 0.0 < update_fraction <= 1.0:
            raise ValueError(f"update_fraction {update_fraction} must be in (0, 1]")
        super().__init__(params, {"lr": lr}, warmup, importance_beta)
        self.update_fraction = update_fraction

    def _keep(self, total: int) -> int:
        return max(1, int(self.update_fraction * total))

    def _update(self, p: torch.Tensor, group: dict, chosen: torch.Tensor | None):
        weights = p.float()
        new = weights - group["lr"] * p.grad.float()
        if chosen is None:
            p.copy_(new)
            return p.numel()
        p.copy_(torch.where(chosen, new, weights))
        return chosen.sum()


class TopKHookState:
    """What the top-k hook keeps between calls: error feedback per bucket and byte counts.

    Counted per process, per bucket of n gradient entries of s bytes: a dense iteration n·s (what DDP's
    all-reduce carries), a sparse one k·(4 + s) for k = ceil(density·n) entries sent as int32 index +
    value; `dense_bytes` adds n·s for every bucket. On 2 processes these are the bytes each process writes
    to gloo's sockets, plus a few hundred bytes of headers per collective (measured:
    benchmarks/bench_comm_hook.py). With W processes a ring all-reduce writes 2(W - 1)/W·n·s per process
    and the all-gathers (W - 1)·k·(4 + s): the sparse share of the traffic grows with W."""

    def __init__(self, density: float, process_group: dist.ProcessGroup | None = None, start_iter: int = 1):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density {density} must be in (0, 1]")
        self.density = density
        self.process_group = process_group
        self.start_iter = start_iter
        self.iteration = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self.bytes_sent = 0
        self.dense_bytes = 0
        self._reported = (0, 0)

    def take_counts(self) -> tuple[int, int]:
        """(bytes sent, dense bytes) since the last call."""
        sent, dense = self.bytes_sent - self._reported[0], self.dense_bytes - self._reported[1]
        self._reported = (self.bytes_sent, self.dense_bytes)
        return sent, dense


def topk_hook(state: TopKHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only each rank's top-k entries (by |grad + residual|), sent as
    int32 indices + values; what is not sent stays in the bucket's residual. The first
    `start_iter` iterations are a plain all-reduce: DDP may rebuild its buckets after the first."""
    tensor = bucket.buffer()
    world = dist.get_world_size(state.process_group)
    state.dense_bytes += tensor.numel() * tensor.element_size()
    dense = state.iteration < state.start_iter
    if bucket.is_last():
        state.iteration += 1
    if dense:
        state.bytes_sent += tensor.numel() * tensor.element_size()
        work = dist.all_reduce(tensor, group=state.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))
    corrected = tensor + state.residuals.get(bucket.index(), torch.zeros_like(tensor))
    k = max(1, math.ceil(state.density * corrected.numel()))
    indices = corrected.abs().topk(k, sorted=False).indices
    values = corrected[indices]
    residual = corrected.clone()
    residual[indices] = 0
    state.residuals[bucket.index()] = residual
    all_indices = [torch.empty_like(indices, dtype=torch.int32) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_indices, indices.to(torch.int32), group=state.process_group)
    dist.all_gather(all_values, values, group=state.process_group)
    state.bytes_sent += k * (4 + values.element_size())
    averaged = torch.zeros_like(tensor)
    averaged.index_add_(0, torch.cat(all_indices).long(), torch.cat(all_values))
    tensor.copy_(averaged.div_(world))
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def register_topk_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, density: float) -> TopKHookState:
    state = TopKHookState(density)
    ddp_model.register_comm_hook(state, topk_hook)
    return state


def hook_report(states: list[TopKHookState]) -> dict[str, float]:
    """This process's bytes under the hooks since the last report, beside DDP's dense all-reduce's."""
    counts = [s.take_counts() for s in states]
    sent, dense = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {"comm/topk_bytes": float(sent), "comm/dense_bytes": float(dense),
            "comm/ratio_to_dense": sent / dense if dense else 0.0}
