"""The update tracker: after every optimizer step, which weights differ from θ0 and from the last step.

It works on the training device, tensor by tensor, with a single host sync per step (all counts
are stacked on the device and copied once). State per parameter: the previous step's weights and
the step at which each weight first changed (int16/int32; -1 = never), from which the "ever
changed" mask follows. θ0 is borrowed from the frozen reference model when it holds the same
weights, so it costs no extra copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .changes import RULES, ChangeRules, changed_masks
from .metrics import block_localization
from .naming import block_index, module_type


@dataclass
class StepCounts:
    """Changed counts of one step, per parameter and rule, against θ0 and against the previous step."""

    step: int
    names: list[str]
    numel: list[int]
    vs_initial: dict[str, list[int]]
    vs_previous: dict[str, list[int]]
    ever_changed: list[int] = field(default_factory=list)

    def total(self, which: str, rule: str) -> int:
        return sum(getattr(self, which)[rule])


def track_tensor(initial: torch.Tensor, previous: torch.Tensor, current: torch.Tensor, first_changed: torch.Tensor,
                 step: torch.Tensor, atol: float, eta: float) -> torch.Tensor:
    """One parameter's step, fusable by torch.compile: 7 counts (3 rules vs θ0, 3 vs previous, ever
    changed), and in place: first_changed gets `step` where θ0's bits first differ, previous <- current."""
    rules = ChangeRules(atol, eta)
    vs_init = changed_masks(initial, current, rules)
    vs_prev = changed_masks(previous, current, rules)
    first_changed.copy_(torch.where(vs_init["exact"] & (first_changed < 0), step, first_changed))
    previous.copy_(current)
    return torch.stack([*(vs_init[r].sum() for r in RULES), *(vs_prev[r].sum() for r in RULES),
                        (first_changed >= 0).sum()])


class UpdateTracker:
    def __init__(self, params: dict[str, torch.Tensor], rules: ChangeRules = ChangeRules(),
                 initial: dict[str, torch.Tensor] | None = None, max_steps: int = 32767, topk: int = 3,
                 compile: bool = True):
        self.params = params
        self.rules = rules
        self.topk = topk
        self.initial = initial if initial is not None else {n: p.detach().clone() for n, p in params.items()}
        missing = [n for n in params if n not in self.initial or self.initial[n].shape != params[n].shape]
        if missing:
            raise ValueError(f"θ0 lacks or mis-shapes {len(missing)} parameters, e.g. {missing[:3]}")
        self.previous = {n: p.detach().clone() for n, p in params.items()}
        step_dtype = torch.int16 if max_steps < 2**15 else torch.int32
        self.first_changed = {n: torch.full(p.shape, -1, dtype=step_dtype, device=p.device) for n, p in params.items()}
        self.blocks = {n: block_index(n) for n in params}
        self.modules = {n: module_type(n) for n in params}
        self.history: list[StepCounts] = []
        on_gpu = any(p.is_cuda for p in params.values())
        self._track = torch.compile(track_tensor, dynamic=True) if (on_gpu and compile) else track_tensor

    @torch.no_grad()
    def update(self, step: int) -> StepCounts:
        """Call right after optimizer.step(); `step` is the number of optimizer steps taken so far."""
        stacked = []
        for name, param in self.params.items():
            step_t = torch.tensor(step, dtype=self.first_changed[name].dtype, device=param.device)
            stacked.append(self._track(self.initial[name].view(-1), self.previous[name].view(-1), param.detach().view(-1),
                                       self.first_changed[name].view(-1), step_t, self.rules.atol, self.rules.eta))
        counts = torch.stack(stacked).cpu().tolist() if stacked else []
        names = list(self.params)
        record = StepCounts(
            step=step, names=names, numel=[self.params[n].numel() for n in names],
            vs_initial={r: [int(c[i]) for c in counts] for i, r in enumerate(RULES)},
            vs_previous={r: [int(c[3 + i]) for c in counts] for i, r in enumerate(RULES)},
            ever_changed=[int(c[6]) for c in counts],
        )
        self.history.append(record)
        return record

    def exact_masks(self) -> dict[str, torch.Tensor]:
        """Weights whose stored bits now differ from θ0: what a compact checkpoint stores."""
        return {n: changed_masks(self.initial[n], p.detach(), self.rules)["exact"] for n, p in self.params.items()}

    def ever_changed_masks(self) -> dict[str, torch.Tensor]:
        return {n: f >= 0 for n, f in self.first_changed.items()}

    def metrics(self, record: StepCounts) -> dict[str, float]:
        """Global sparsity, per-block localization and per-module fractions for logging."""
        total = sum(record.numel)
        out: dict[str, float] = {}
        for rule in RULES:
            changed = record.total("vs_initial", rule)
            out[f"sparsity/{rule}"] = 1 - changed / total
            out[f"changed/{rule}"] = changed / total
            out[f"step_change/{rule}"] = record.total("vs_previous", rule) / total
        out["changed/ever_exact"] = sum(record.ever_changed) / total
        blocks = sorted({b for b in self.blocks.values() if b is not None})
        if blocks:
            for rule in RULES:
                per_block = {b: [0, 0] for b in blocks}
                for name, n, c in zip(record.names, record.numel, record.vs_initial[rule]):
                    b = self.blocks[name]
                    if b is not None:
                        per_block[b][0] += c
                        per_block[b][1] += n
                loc = block_localization([per_block[b][0] for b in blocks], [0.0] * len(blocks),
                                         [per_block[b][1] for b in blocks], self.topk)
                for variant in ("count", "count_per_weight"):
                    for metric, value in loc[variant].items():
                        if value is not None:
                            out[f"localization/{rule}/{variant}/{metric}"] = value
        per_module: dict[str, list[int]] = {}
        for name, n, c in zip(record.names, record.numel, record.vs_initial["relative"]):
            slot = per_module.setdefault(self.modules[name], [0, 0])
            slot[0] += c
            slot[1] += n
        for module, (c, n) in per_module.items():
            out[f"module/{module}/relative"] = c / n
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides θ0 and the weights: the step each weight first changed."""
        return {f"first_changed::{n}": t for n, t in self.first_changed.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore after the weights were restored: the previous step's weights are the current ones."""
        for n, p in self.params.items():
            self.previous[n].copy_(p.detach())
            self.first_changed[n].copy_(state[f"first_changed::{n}"])
