"""ASPG, adaptive sparse policy gradients: AdamW that, after a dense warm-up, updates only the
globally most important entries, and a DDP communication hook that sends only the top-k gradients.

Importance is an EMA of |grad|. After `warmup` dense steps each step updates the global top
(1 − sparsity) fraction of entries (exactly that many, chosen across all tensors by the same exact
radix select that global pruning masks use); the gradient of every other entry is carried forward
(error feedback) and added to its next gradient, so no gradient mass is lost. Adam's moments and
bias corrections advance per entry, only when the entry is updated; the rest of the model is
bit-for-bit unchanged by the step, weight decay included.

The optimizer state and its arithmetic are float32 whatever the weights' dtype: in bf16, beta2 = 0.999
rounds to 1, so the bias correction 1 - beta2**t would be 0 (no update, or 0/0 = NaN for a zero
gradient). A bf16 weight receives the float32 result rounded once, at the end.
"""

import math

import torch
import torch.distributed as dist

from .importance import smallest_global


class ASPG(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sparsity: float = 0.9, warmup: int = 10, importance_beta: float = 0.9):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
        if warmup < 0 or not 0.0 <= importance_beta < 1.0:
            raise ValueError("warmup must be >= 0 and importance_beta in [0, 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.sparsity = sparsity
        self.warmup = warmup
        self.importance_beta = importance_beta
        self._updated: torch.Tensor | int = 0

    @property
    def last_updated(self) -> int:
        """Entries the last step updated (read on demand: no host sync inside step())."""
        return int(self._updated)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.long)
            for key in ("exp_avg", "exp_avg_sq", "importance", "residual"):
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["updates"] = torch.zeros_like(p, dtype=torch.int32)
        return state

    KEEP_DTYPE = ("step", "exp_avg", "exp_avg_sq", "importance", "residual", "updates")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every restored state tensor to its parameter's dtype; the float32 moments, importance
        EMA and residual and the int32 update counts must keep theirs (a bf16 model's counts would stop at 256).
        Each is a copy: the state is updated in place and must not be shared with `state_dict`'s owner."""
        kept = {i: {k: v for k, v in st.items() if k in self.KEEP_DTYPE} for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, values in kept.items():
            for key, value in values.items():
                self.state[params[i]][key] = value.to(params[i].device, copy=True)

    def _selection(self, params: list[torch.Tensor], step: int) -> dict[int, torch.Tensor] | None:
        """Per parameter (by position), the entries this step updates; None = all (warm-up)."""
        if step <= self.warmup or self.sparsity == 0.0:
            return None
        scores = {str(i): self.state[p]["importance"] for i, p in enumerate(params)}
        total = sum(s.numel() for s in scores.values())
        keep = max(1, round((1.0 - self.sparsity) * total))
        dropped = smallest_global(scores, total - keep)
        return {int(i): ~d for i, d in dropped.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        params = [p for p, _ in entries]
        for p in params:
            state = self._state(p)
            state["step"] += 1
            state["importance"].mul_(self.importance_beta).add_(p.grad.float().abs(), alpha=1 - self.importance_beta)
        if not params:
            return loss
        step = int(self.state[params[0]]["step"])
        selection = self._selection(params, step)
        updated = 0
        for i, (p, group) in enumerate(entries):
            state = self.state[p]
            grad = p.grad.float() + state["residual"]
            beta1, beta2 = group["betas"]
            if selection is None:
                chosen = torch.ones_like(p, dtype=torch.bool)
            else:
                chosen = selection[i]
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
            updated = updated + chosen.sum()
        self._updated = updated
        return loss


class TopKHookState:
    """What the top-k hook keeps between calls: error feedback per bucket and byte counts."""

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
