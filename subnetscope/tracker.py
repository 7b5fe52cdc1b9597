"""The update tracker: after every optimizer step, which weights differ from θ0 and from the last step.

Parameters of one dtype and device form a group. Each step the group's parameters are gathered
into one flat buffer (each tensor padded to a multiple of CHUNK), and a single function, fused
by torch.compile on a GPU, compares it with θ0 and with the previous step under the three rules,
updates the step at which each weight first changed, and returns counts and Σ|Δ|, Σ|Δ|², max |Δ|
(vs θ0) per CHUNK; per-tensor values are sums (maxima) over each tensor's chunks. One host sync per step.

State per parameter: the previous step's weights and the step at which each weight first changed
(int16, or int32 past 32767 steps; -1 = never), from which the "ever changed" mask follows. θ0 is
borrowed from the frozen reference model when it holds the same weights: the reference model's
parameters are rebound to views of the tracker's flat θ0 buffer, so no second copy exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .changes import (
    RULES,
    ChangeRules,
    apply_rules,
    as_bits,
    bits_differ,
    changed_masks,
    compute_dtype,
    negate,
)
from .metrics import block_localization
from .naming import block_index, module_type, tower

CHUNK = 4096


@dataclass
class StepCounts:
    """Changed counts of one step, per parameter and rule, against θ0 and against the previous step."""

    step: int
    names: list[str]
    numel: list[int]
    vs_initial: dict[str, list[int]]
    vs_previous: dict[str, list[int]]
    ever_changed: list[int] = field(default_factory=list)
    # |Δ| vs θ0 over the entries where it is finite (as the analysis's abs_delta_* columns): per parameter
    abs_sum: list[float] = field(default_factory=list)
    abs_sq_sum: list[float] = field(default_factory=list)
    abs_max: list[float] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)  # entries whose |Δ| is NaN or inf (left out of the above)

    def total(self, which: str, rule: str) -> int:
        return sum(getattr(self, which)[rule])


FLOAT_STATS = ("abs_sum", "abs_sq_sum", "abs_max")  # |Δ| vs θ0, after the counts in `_FlatGroup.update`'s rows


def count_names() -> list[str]:
    """The rows of `track_flat`'s counts, by name: each rule vs θ0 (`vs_initial/<rule>`), each vs the
    previous step (`vs_previous/<rule>`), `ever_changed` and `nonfinite`."""
    return ([f"vs_initial/{r}" for r in RULES] + [f"vs_previous/{r}" for r in RULES]
            + ["ever_changed", "nonfinite"])


def track_flat(initial: torch.Tensor, previous: torch.Tensor, current: torch.Tensor, first_changed: torch.Tensor,
               step: torch.Tensor, atol: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's step on flat buffers: per-CHUNK counts (len(count_names()), n/CHUNK) of the rules vs
    θ0, the rules vs the previous step, "ever changed" and the changed entries whose |Δ| vs θ0 is NaN
    or inf; and per-CHUNK FLOAT_STATS (3, n/CHUNK, in the compute dtype): Σ|Δ|, Σ|Δ|² and max |Δ| vs θ0
    over the finite |Δ|. In place, first_changed and previous are updated."""
    rules = ChangeRules(atol, eta)
    calc = compute_dtype(initial.dtype)
    # changes.changed_masks, keeping the |Δ| it computes anyway: the statistics cost no second difference
    vs_init, absd = apply_rules(bits_differ(initial, current), initial.to(calc), current.to(calc), rules)
    vs_prev = changed_masks(previous, current, rules)
    first = torch.where(vs_init["exact"] & (first_changed < 0), step, first_changed)
    first_changed.copy_(first)
    as_bits(previous).copy_(as_bits(current))  # bit for bit: a NaN's payload is a stored change too
    finite = torch.isfinite(absd)
    masks = {**{f"vs_initial/{r}": vs_init[r] for r in RULES}, **{f"vs_previous/{r}": vs_prev[r] for r in RULES},
             "ever_changed": first >= 0, "nonfinite": vs_init["exact"] & negate(finite)}
    counts = torch.stack([masks[name].view(-1, CHUNK).sum(dim=1, dtype=torch.int32) for name in count_names()])
    absd = torch.where(finite, absd, torch.zeros((), dtype=calc, device=absd.device)).view(-1, CHUNK)
    return counts, torch.stack([absd.sum(dim=1), absd.square().sum(dim=1), absd.amax(dim=1)])


def copy_bits(dest: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """One multi-tensor copy that keeps every stored bit (see `changes.as_bits`), converting a
    source of another dtype first."""
    torch._foreach_copy_([as_bits(d) for d in dest], [as_bits(s.to(d.dtype)) for d, s in zip(dest, src)])


class _FlatGroup:
    """Parameters of one dtype and device, laid out in flat buffers padded to CHUNK boundaries.

    `current` is a scratch buffer refilled each step by one multi-tensor copy; padding stays zero
    in every buffer, so it never counts as changed. A borrowed θ0 (the reference model's
    parameters) is rebound to views of `initial`, so the reference model and the tracker share it.
    """

    def __init__(self, names: list[str], params: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                 borrowed: bool, step_dtype: torch.dtype, compile: bool, dtype: torch.dtype):
        self.names = names
        self.params = [params[n] for n in names]
        sizes = [p.numel() for p in self.params]
        padded = [-(-s // CHUNK) * CHUNK for s in sizes]
        self.offsets = [sum(padded[:i]) for i in range(len(names))]
        total = sum(padded)
        device = self.params[0].device
        # weights kept in another dtype (fp32 masters judged at bf16) are rounded into the buffers each step
        self.rounds = self.params[0].dtype != dtype
        self.current = torch.zeros(total, dtype=dtype, device=device)
        views = [self.view(self.current, i) for i in range(len(names))]
        self._current_views = views if self.rounds else [as_bits(v) for v in views]
        self.previous = torch.zeros_like(self.current)
        self.initial = torch.zeros_like(self.current)
        self._initial_views = [self.view(self.initial, i) for i in range(len(names))]
        copy_bits(self._initial_views, [initial[n].detach() for n in names])
        if borrowed and all(initial[n].dtype == dtype for n in names):
            # the frozen reference now lives in our flat θ0 buffer: no second copy
            for view, name in zip(self._initial_views, names):
                initial[name].data = view
        copy_bits([self.view(self.previous, i) for i in range(len(names))], [p.detach() for p in self.params])
        self.first_changed = torch.full((total,), -1, dtype=step_dtype, device=device)
        self.chunk_bounds = torch.tensor([o // CHUNK for o in self.offsets] + [total // CHUNK], device=device)
        # the parameter each chunk belongs to (chunks never straddle two): for per-parameter maxima
        self.chunk_owner = torch.repeat_interleave(torch.arange(len(names), device=device),
                                                   self.chunk_bounds[1:] - self.chunk_bounds[:-1])
        self._step_fn = torch.compile(track_flat, dynamic=False) if compile else track_flat

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i]:self.offsets[i] + self.params[i].numel()].view(self.params[i].shape)

    def update(self, step: int, atol: float, eta: float) -> torch.Tensor:
        """Per tensor, still on the device, float64 (len(names), len(count_names()) + 3): the counts of
        `track_flat`, then FLOAT_STATS (counts stay exact in float64: one tensor, one host sync)."""
        if self.rounds:  # round to nearest even, as .to(dtype) and a published checkpoint do
            torch._foreach_copy_(self._current_views, [p.detach() for p in self.params])
        else:
            torch._foreach_copy_(self._current_views, [as_bits(p.detach()) for p in self.params])
        step_t = torch.tensor(step, dtype=self.first_changed.dtype, device=self.current.device)
        counts, floats = self._step_fn(self.initial, self.previous, self.current, self.first_changed, step_t,
                                       atol, eta)
        lo, hi = self.chunk_bounds[:-1], self.chunk_bounds[1:]
        cumulative = torch.nn.functional.pad(counts.long().cumsum(dim=1), (1, 0))
        sums = torch.nn.functional.pad(floats[:2].double().cumsum(dim=1), (1, 0))
        maxima = torch.zeros(len(self.names), dtype=torch.float64, device=floats.device)
        maxima.scatter_reduce_(0, self.chunk_owner, floats[2].double(), "amax")
        return torch.cat([(cumulative[:, hi] - cumulative[:, lo]).double(), sums[:, hi] - sums[:, lo],
                          maxima.unsqueeze(0)]).T


class UpdateTracker:
    def __init__(self, params: dict[str, torch.Tensor], rules: ChangeRules = ChangeRules(),
                 initial: dict[str, torch.Tensor] | None = None, max_steps: int = 32767, topk: int = 3,
                 compile: bool = True, view_dtype: torch.dtype | None = None):
        """`view_dtype`: judge the weights rounded to this dtype (θ0 and θ_t alike), as they would be
        published: fp32 master weights judged at bf16. None: in the weights' own dtype."""
        self.params = params
        self.rules = rules
        self.topk = topk
        self.view_dtype = view_dtype
        borrowed = initial is not None
        reference = initial if borrowed else {n: p.detach() for n, p in params.items()}
        missing = [n for n in params if n not in reference or reference[n].shape != params[n].shape]
        if missing:
            raise ValueError(f"θ0 lacks or mis-shapes {len(missing)} parameters, e.g. {missing[:3]}")
        step_dtype = torch.int16 if max_steps < 2**15 else torch.int32
        by_kind: dict[tuple, list[str]] = {}
        for name, p in params.items():
            by_kind.setdefault((p.dtype, p.device), []).append(name)
        self.groups = [_FlatGroup(names, params, reference, borrowed, step_dtype, compile and device.type == "cuda",
                                  view_dtype or dtype)
                       for (dtype, device), names in by_kind.items()]
        # θ0 per tensor (at the view dtype): views into the groups' buffers, which a borrowed reference shares
        self.initial = {n: g.view(g.initial, i) for g in self.groups for i, n in enumerate(g.names)}
        self.previous: dict[str, torch.Tensor] = {}
        self.first_changed: dict[str, torch.Tensor] = {}
        for group in self.groups:
            for i, name in enumerate(group.names):
                self.previous[name] = group.view(group.previous, i)
                self.first_changed[name] = group.view(group.first_changed, i)
        self.names = [n for g in self.groups for n in g.names]
        self.blocks = {n: block_index(n) for n in params}
        self.modules = {n: module_type(n) for n in params}
        self.towers = {n: tower(n) for n in params}
        self.history: list[StepCounts] = []

    @torch.no_grad()
    def update(self, step: int) -> StepCounts:
        """Call right after optimizer.step(); `step` is the number of optimizer steps taken so far."""
        per_group = [g.update(step, self.rules.atol, self.rules.eta) for g in self.groups]
        table = torch.cat([c.to(per_group[0].device) for c in per_group]).cpu().tolist() if per_group else []
        rows = [dict(zip(count_names() + list(FLOAT_STATS), values)) for values in table]
        counts = {name: [int(row[name]) for row in rows] for name in count_names()}
        record = StepCounts(
            step=step, names=self.names, numel=[self.params[n].numel() for n in self.names],
            vs_initial={r: counts[f"vs_initial/{r}"] for r in RULES},
            vs_previous={r: counts[f"vs_previous/{r}"] for r in RULES},
            ever_changed=counts["ever_changed"], nonfinite=counts["nonfinite"],
            **{name: [row[name] for row in rows] for name in FLOAT_STATS},
        )
        self.history.append(record)
        return record

    def published(self, name: str) -> torch.Tensor:
        """A parameter as it is judged (and checkpointed): rounded to the view dtype, if any."""
        p = self.params[name].detach()
        return p.to(self.view_dtype) if self.view_dtype is not None else p

    def exact_masks(self) -> dict[str, torch.Tensor]:
        """Weights whose stored bits now differ from θ0 at the view dtype: what a compact checkpoint stores."""
        return {n: changed_masks(self.initial[n], self.published(n), self.rules)["exact"] for n in self.params}

    def metrics(self, record: StepCounts) -> dict[str, float]:
        """Global sparsity, per-block localization, per-module fractions and per-layer |Δ| for logging."""
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
        out.update(self.tower_metrics(record))
        out.update(self.abs_delta_metrics(record))
        return out

    def tower_metrics(self, record: StepCounts) -> dict[str, float]:
        """For a multimodal model, the changed fraction of each tower (`tower/text/changed/<rule>`, vision,
        audio): the global `changed/<rule>` counts the towers' weights too. Nothing for a text-only model."""
        if len(set(self.towers.values())) < 2:
            return {}
        out = {}
        for rule in RULES:
            totals: dict[str, list[int]] = {}
            for name, n, c in zip(record.names, record.numel, record.vs_initial[rule]):
                slot = totals.setdefault(self.towers[name], [0, 0])
                slot[0] += c
                slot[1] += n
            out.update({f"tower/{t}/changed/{rule}": c / n if n else 0.0 for t, (c, n) in totals.items()})
        return out

    def abs_delta_metrics(self, record: StepCounts) -> dict[str, float]:
        """max / mean / std of |Δ| vs θ0 per layer (`abs_delta/layer_<i>/...`; `outside`: embeddings, final norm,
        heads, ...) and over all weights (`abs_delta/all/...`), over the finite |Δ| as the analysis computes them."""
        if not record.abs_sum:  # a record made elsewhere without the statistics
            return {}
        slots: dict[str, list[float]] = {}
        order = sorted(self.blocks.values(), key=lambda b: (b is None, b or 0))
        for b in order:
            slots.setdefault("outside" if b is None else f"layer_{b}", [0.0, 0.0, 0.0, 0])
        slots["all"] = [0.0, 0.0, 0.0, 0]
        for i, name in enumerate(record.names):
            b = self.blocks[name]
            for key in ("outside" if b is None else f"layer_{b}", "all"):
                slot = slots[key]  # Σ|Δ|, Σ|Δ|², max |Δ|, finite entries
                slot[0] += record.abs_sum[i]
                slot[1] += record.abs_sq_sum[i]
                slot[2] = max(slot[2], record.abs_max[i])
                slot[3] += record.numel[i] - record.nonfinite[i]
        out = {}
        for key, (total, squares, largest, n) in slots.items():
            mean = total / n if n else 0.0
            out[f"abs_delta/{key}/max"] = largest
            out[f"abs_delta/{key}/mean"] = mean
            out[f"abs_delta/{key}/std"] = max(squares / n - mean * mean, 0.0) ** 0.5 if n else 0.0
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides θ0 and the weights: the step each weight first changed."""
        return {f"first_changed::{n}": t.clone() for n, t in self.first_changed.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore after the weights were restored: the previous step's weights are the current ones."""
        for n in self.params:
            as_bits(self.previous[n]).copy_(as_bits(self.published(n)))
            self.first_changed[n].copy_(state[f"first_changed::{n}"])
