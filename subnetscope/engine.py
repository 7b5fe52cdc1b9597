"""Streaming comparisons: one checkpoint pair, a series of checkpoints, and two runs' overlap.

Tensors are read one at a time from memory-mapped files; a series is walked tensor-major (every
checkpoint's copy of one tensor, then the next tensor), so peak memory stays a few tensors.

`view_dtype` (bfloat16, float16, float32) judges every comparison at a view: both sides of each tensor
pair are rounded to it (round to nearest even, as `.to()` and a bf16 checkpoint save do) before any rule
or statistic, so two float32 runs compare as the bf16 checkpoints they would publish. None compares each
checkpoint in its own dtype.
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .changes import RULES, ChangeRules, changed_masks, diff_stats, wider_dtype
from .checkpoint import ScratchBuffer, TensorSource
from .errors import SubnetscopeError, warn
from .metrics import (
    UpdateRanks,
    block_localization,
    overlap,
    shell_density,
    shell_edges,
    update_rank,
)
from .naming import TEXT_TOWER, block_index, module_type, neuron_axis, tower
from .precision import VIEW_DTYPES
from .segments import batchable, compare_segments

DEFAULT_SHELLS = (8192, 16384)


@dataclass
class TensorResult:
    name: str
    block: int | None
    module: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    changed: dict[str, int]
    abs_max: float
    abs_mean: float
    abs_std: float
    abs_sum: float
    relative_norm: float
    nonfinite_base: int
    nonfinite_tuned: int
    rank: int | None = None  # numerical rank (metrics.RANK_DEFINITIONS)
    full_rank: int | None = None
    note: str = ""
    tower: str = TEXT_TOWER  # text, or a multimodal checkpoint's vision / audio tower
    rank_energy99: int | None = None
    rank_plan: int | None = None

    def fraction(self, rule: str) -> float:
        return self.changed[rule] / self.numel if self.numel else 0.0


@dataclass
class PairResult:
    base: str
    tuned: str
    rules: ChangeRules
    tensors: list[TensorResult]
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shells: list[dict] = field(default_factory=list)
    view_dtype: str | None = None  # the dtype both sides were rounded to; None = each checkpoint's own

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def changed(self, rule: str) -> int:
        return sum(t.changed[rule] for t in self.tensors)

    def fraction(self, rule: str) -> float:
        return self.changed(rule) / self.numel if self.numel else 0.0

    def group(self, key: str, only_tower: str | None = None) -> dict:
        """Totals per block (key="block"; None = outside blocks), per module type (key="module") or per
        tower (key="tower": text, vision, audio); with `only_tower`, of that tower's tensors alone."""
        groups: dict = defaultdict(lambda: {"numel": 0, "abs_sum": 0.0, "tensors": 0, **{r: 0 for r in RULES}})
        for t in self.tensors:
            if only_tower is not None and t.tower != only_tower:
                continue
            g = groups[getattr(t, key)]
            g["numel"] += t.numel
            g["abs_sum"] += t.abs_sum
            g["tensors"] += 1
            for r in RULES:
                g[r] += t.changed[r]
        return dict(groups)

    def towers(self) -> dict[str, dict]:
        """Per tower (the text model first), its weights, changed counts and fractions per rule: a
        multimodal checkpoint's vision tower is reported beside the text model, never inside it."""
        groups = self.group("tower")
        order = sorted(groups, key=lambda t: (t != TEXT_TOWER, t))
        return {t: {"numel": groups[t]["numel"], "tensors": groups[t]["tensors"],
                    "changed": {r: groups[t][r] for r in RULES},
                    "fraction_changed": {r: groups[t][r] / groups[t]["numel"] if groups[t]["numel"] else 0.0
                                         for r in RULES}}
                for t in order}

    def blocks(self) -> list[int]:
        return sorted({t.block for t in self.tensors if t.block is not None})

    def localization(self, k: int = 3) -> dict[str, dict]:
        """Per rule: Gini / entropy / top-k across blocks of counts and Σ|Δ|, raw and per weight."""
        per_block = self.group("block")
        blocks = self.blocks()
        sizes = [per_block[b]["numel"] for b in blocks]
        abs_sum = [per_block[b]["abs_sum"] for b in blocks]
        return {
            rule: block_localization([per_block[b][rule] for b in blocks], abs_sum, sizes, k)
            for rule in RULES
        }


def view_of(view_dtype: str | None) -> torch.dtype | None:
    """The dtype named by `--view_dtype` (None: each checkpoint's own), or a one-line error."""
    if view_dtype is None:
        return None
    if view_dtype not in VIEW_DTYPES:
        raise SubnetscopeError(f"--view_dtype {view_dtype!r}: use {', '.join(VIEW_DTYPES)} (or leave it out to "
                               "compare each checkpoint in its own dtype)")
    return VIEW_DTYPES[view_dtype]


def at_view(x: torch.Tensor, view: torch.dtype | None) -> torch.Tensor:
    """x rounded to the view dtype (RNE, like `.to()`); x itself without a view."""
    return x if view is None else x.to(view)


def _common_region(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slices = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
    return a[slices], b[slices]


def _pair_names(base: TensorSource, tuned: TensorSource) -> tuple[list[str], list[str], list[str]]:
    tuned_names = set(tuned.names())
    base_names = set(base.names())
    common = [n for n in base.names() if n in tuned_names]
    only_base = [n for n in base.names() if n not in tuned_names]
    only_tuned = [n for n in tuned.names() if n not in base_names]
    if not common:
        raise SubnetscopeError(
            f"{base.label} and {tuned.label} share no tensor names: are they the same architecture?"
        )
    if only_base or only_tuned:
        listed = ", ".join((only_base + only_tuned)[:8])
        more = len(only_base) + len(only_tuned) - 8
        warn(
            f"{len(only_base)} tensors only in the base and {len(only_tuned)} only in the tuned model "
            f"were not compared: {listed}{f' (+{more} more)' if more > 0 else ''}"
        )
    return common, only_base, only_tuned


def _load_pair(base: TensorSource, tuned: TensorSource, name: str, notes: list[str],
               scratch: tuple[ScratchBuffer, ScratchBuffer] | tuple[None, None] = (None, None),
               view: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    a, b = base.get(name, scratch[0]), tuned.get(name, scratch[1])
    a, b = at_view(a, view), at_view(b, view)
    note = []
    if a.dim() != b.dim():
        raise SubnetscopeError(f"{name}: {tuple(a.shape)} vs {tuple(b.shape)} have different ranks "
                               f"and cannot be compared")
    if a.shape != b.shape:
        a, b = _common_region(a, b)
        note.append(f"shape {tuple(base.shape(name))} vs {tuple(tuned.shape(name))}: "
                    f"compared the common {tuple(a.shape)}")
    if a.dtype != b.dtype:
        note.append(f"dtype {a.dtype} vs {b.dtype}: compared in {wider_dtype(a.dtype, b.dtype)}")
    if note:
        msg = f"{name}: " + "; ".join(note)
        warn(msg)
        notes.append(msg)
    return a, b, "; ".join(note)


SCRATCH_BUDGET = 768 << 20


def default_workers(tensor_bytes: Sequence[int], device: str = "cpu") -> int:
    """Tensors compared at once: reads (pread releases the GIL) overlap each other and the compute.

    Up to 8 on the CPU, 4 for a GPU (whose kernels are quick: more threads only contend for the
    GIL; measured on an H100). Each worker keeps two grow-only scratch buffers; one ends up holding
    the largest tensor, the others about the second largest, so the count keeps those within
    SCRATCH_BUDGET."""
    second = sorted(tensor_bytes)[-2] if len(tensor_bytes) > 1 else 0
    most = 4 if torch.device(device).type == "cuda" else 8
    return max(1, min(most, os.cpu_count() or 1, SCRATCH_BUDGET // max(1, 2 * second)))


@contextmanager
def _intra_op_threads(device: str, workers: int):
    """On the CPU, split the cores between the workers instead of giving each op every core."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_stream(device: str) -> "torch.cuda.Stream | None":
    """Each worker's GPU work on its own stream, so one worker's host sync does not wait for another's."""
    return torch.cuda.Stream(device=device) if torch.device(device).type == "cuda" else None


def _tensor_result(name: str, shape: tuple[int, ...], dtype: torch.dtype, stats, note: str = "",
                   ranks: UpdateRanks | None = None) -> TensorResult:
    tr = TensorResult(
        name=name, block=block_index(name), module=module_type(name), shape=tuple(shape),
        numel=stats.numel, dtype=str(dtype).replace("torch.", ""), changed=stats.changed,
        abs_max=stats.abs_max, abs_mean=stats.abs_mean, abs_std=stats.abs_std, abs_sum=stats.abs_sum,
        relative_norm=stats.relative_norm, nonfinite_base=stats.nonfinite_base,
        nonfinite_tuned=stats.nonfinite_tuned, note=note, tower=tower(name),
    )
    if ranks is not None:
        tr.rank, tr.full_rank, tr.rank_energy99, tr.rank_plan = ranks
    return tr


def _tensor_by_tensor(base: TensorSource, tuned: TensorSource, names: Sequence[str], rules: ChangeRules,
                      device: str, rank: bool, notes: list[str], workers: int | None,
                      view: torch.dtype | None = None) -> Iterable[tuple]:
    """(TensorResult, DiffStats, neuron axis) per tensor, compared by a pool of threads that each
    read into their own reusable buffers; with a view both sides are rounded to it first."""
    local = threading.local()
    pin = torch.device(device).type == "cuda"

    def compare(name: str):
        if not hasattr(local, "scratch"):
            local.scratch = (ScratchBuffer(pin), ScratchBuffer(pin))
            local.stream = _worker_stream(device)
        with torch.cuda.stream(local.stream):
            return compare_on_stream(name, local.scratch)

    def compare_on_stream(name: str, scratch: tuple[ScratchBuffer, ScratchBuffer]):
        a, b, note = _load_pair(base, tuned, name, notes, scratch, view)
        axis = neuron_axis(name, tuple(a.shape))
        stats = diff_stats(a, b, rules, per_row_col=axis is not None, device=device)
        ranks = None
        if rank and a.dim() == 2:
            delta = b.to(device=device, dtype=torch.float32) - a.to(device=device, dtype=torch.float32)
            ranks = update_rank(delta, device)
        return _tensor_result(name, a.shape, a.dtype, stats, note, ranks), stats, axis

    if not names:
        return
    workers = workers or default_workers([base.numel(n) * base.dtype(n).itemsize for n in names], device)
    with _intra_op_threads(device, workers), ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(compare, names)


def analyze_pair(
    base: TensorSource,
    tuned: TensorSource,
    rules: ChangeRules = ChangeRules(),
    device: str = "cpu",
    rank: bool = False,
    shells: Sequence[int] = DEFAULT_SHELLS,
    progress: bool = True,
    workers: int | None = None,
    view_dtype: str | None = None,
) -> PairResult:
    """Every per-tensor metric for one (base, tuned) pair, streamed tensor by tensor; on a GPU the
    tensors that match on both sides go through the batched pass (`segments`, which rounds each
    segment to the view on the device), the rest one by one. Judged at `view_dtype` when given."""
    view = view_of(view_dtype)
    common, only_base, only_tuned = _pair_names(base, tuned)
    result = PairResult(base.label, tuned.label, rules, [], only_base, only_tuned, view_dtype=view_dtype)
    shell_acc: dict[tuple[str, int], dict] = {}
    on_gpu = torch.device(device).type == "cuda"
    batched = [n for n in common if on_gpu and batchable(base, tuned, n, rank)]
    batched_set = set(batched)
    one_by_one = [n for n in common if n not in batched_set]
    found: dict[str, TensorResult] = {}
    bar = tqdm(total=2 * sum(base.numel(n) * base.dtype(n).itemsize for n in common), unit="B", unit_scale=True,
               desc="comparing", disable=not progress)

    def record(tr: TensorResult, stats, axis: int | None) -> None:
        if axis is not None:
            _accumulate_shells(shell_acc, tr, stats, axis, shells)
        if stats.nonfinite_base or stats.nonfinite_tuned:
            msg = (f"{tr.name}: NaN/inf weights: {stats.nonfinite_base} in the base, "
                   f"{stats.nonfinite_tuned} in the tuned model")
            warn(msg)
            result.notes.append(msg)
        found[tr.name] = tr
        bar.update(base.numel(tr.name) * base.dtype(tr.name).itemsize * 2)

    for name, stats, ranks in compare_segments(base, tuned, batched, rules, device, rank, view=view):
        shape = tuple(base.shape(name))
        record(_tensor_result(name, shape, view or base.dtype(name), stats, ranks=ranks), stats,
               neuron_axis(name, shape))
    for tr, stats, axis in _tensor_by_tensor(base, tuned, one_by_one, rules, device, rank, result.notes, workers,
                                             view):
        record(tr, stats, axis)
    bar.close()
    result.tensors = [found[n] for n in common]
    result.shells = _finish_shells(shell_acc, shells)
    return result


def _accumulate_shells(acc: dict, tr: TensorResult, stats, axis: int, boundaries: Sequence[int]) -> None:
    counts_by_rule = stats.row_changed if axis == 0 else stats.col_changed
    neurons = tr.shape[axis]
    per_neuron = tr.shape[1 - axis]
    edges = shell_edges(neurons, boundaries)
    for rule in RULES:
        rows = shell_density(counts_by_rule[rule].numpy(), per_neuron, edges)
        for row in rows:
            slot = acc.setdefault((rule, row["shell"]),
                                  {"rule": rule, "shell": row["shell"], "weights": 0, "changed": 0, "matrices": 0})
            slot["weights"] += row["weights"]
            slot["changed"] += row["changed"]
            slot["matrices"] += 1


def _finish_shells(acc: dict, boundaries: Sequence[int]) -> list[dict]:
    rows = []
    for rule in RULES:
        slots = sorted((v for (r, _), v in acc.items() if r == rule), key=lambda v: v["shell"])
        total_w = sum(s["weights"] for s in slots)
        overall = sum(s["changed"] for s in slots) / total_w if total_w else 0.0
        for s in slots:
            density = s["changed"] / s["weights"] if s["weights"] else 0.0
            rows.append({
                **s, "changed": int(s["changed"]),
                "boundary": boundaries[s["shell"]] if s["shell"] < len(boundaries) else None,
                "density": density, "expected_uniform": overall,
                "ratio_to_uniform": density / overall if overall > 0 else None,
            })
    return rows


@dataclass
class SeriesResult:
    steps: list[int]
    numel: int
    density: dict[str, list[float]]
    coverage: dict[str, list[float]]
    consecutive: dict[str, list[float]]
    hot_histogram: dict[str, list[int]]
    hot_tensors: list[dict]
    block_counts: dict[str, dict[int, list[int]]]
    block_sizes: dict[int, int]


def analyze_series(
    base: TensorSource,
    checkpoints: Sequence[tuple[int, TensorSource]],
    rules: ChangeRules = ChangeRules(),
    device: str = "cpu",
    progress: bool = True,
    view_dtype: str | None = None,
) -> SeriesResult:
    """Density, coverage, consecutive change and how often each weight changed, over checkpoints
    (every checkpoint rounded to `view_dtype` when given)."""
    view = view_of(view_dtype)
    if len(checkpoints) < 2:
        raise SubnetscopeError(
            "a series needs at least two checkpoints: use --base/--tuned for a single pair, or lower --step_interval"
        )
    steps = [s for s, _ in checkpoints]
    sources = [src for _, src in checkpoints]
    name_sets = [set(s.names()) for s in sources]
    names = [n for n in base.names() if all(n in names_ for names_ in name_sets)]
    if not names:
        raise SubnetscopeError("the base and the checkpoints share no tensor names")
    T = len(sources)
    changed = {r: np.zeros(T, dtype=np.int64) for r in RULES}
    covered = {r: np.zeros(T, dtype=np.int64) for r in RULES}
    consecutive = {r: np.zeros(T, dtype=np.int64) for r in RULES}
    final_total = {r: 0 for r in RULES}
    hot_hist = {r: np.zeros(T + 1, dtype=np.int64) for r in RULES}
    block_counts: dict[str, dict[int, np.ndarray]] = {r: {} for r in RULES}
    block_sizes: dict[int, int] = defaultdict(int)
    hot_tensors = []
    numel = 0
    dev = torch.device(device)
    for name in tqdm(names, desc="series", unit="tensor", disable=not progress):
        shapes = {tuple(base.shape(name))} | {tuple(s.shape(name)) for s in sources}
        if len(shapes) != 1:
            warn(f"{name}: shape changes across the series {sorted(shapes)}; left out of the series")
            continue
        theta0 = at_view(base.get(name).to(dev), view)
        final = at_view(sources[-1].get(name).to(dev), view)
        final_masks = changed_masks(theta0, final, rules)
        prev = theta0
        counters = {r: torch.zeros(theta0.shape, dtype=torch.int16, device=dev) for r in RULES}
        blk = block_index(name)
        if blk is not None:
            block_sizes[blk] += theta0.numel()
        step_counts = {r: [] for r in RULES}
        for t, src in enumerate(sources):
            cur = final if t == T - 1 else at_view(src.get(name).to(dev), view)
            vs_base = changed_masks(theta0, cur, rules)
            vs_prev = changed_masks(prev, cur, rules)
            for r in RULES:
                step_counts[r].append(torch.stack([
                    vs_base[r].sum(), (vs_base[r] & final_masks[r]).sum(), vs_prev[r].sum()
                ]))
                counters[r] += vs_prev[r]
            prev = cur
        numel += theta0.numel()
        tensor_row = {"name": name, "numel": theta0.numel()}
        for r in RULES:
            arr = torch.stack(step_counts[r]).cpu().numpy()
            changed[r] += arr[:, 0]
            covered[r] += arr[:, 1]
            consecutive[r] += arr[:, 2]
            final_total[r] += int(final_masks[r].sum())
            hot_hist[r] += torch.bincount(counters[r].reshape(-1).long(), minlength=T + 1).cpu().numpy()[: T + 1]
            tensor_row[f"mean_times_changed_{r}"] = float(counters[r].float().mean())
            if blk is not None:
                block_counts[r].setdefault(blk, np.zeros(T, dtype=np.int64))
                block_counts[r][blk] += arr[:, 0]
        hot_tensors.append(tensor_row)
    return SeriesResult(
        steps=steps,
        numel=numel,
        density={r: (changed[r] / numel).tolist() for r in RULES},
        coverage={r: ((covered[r] / final_total[r]).tolist() if final_total[r] else [None] * T) for r in RULES},
        consecutive={r: (consecutive[r] / numel).tolist() for r in RULES},
        hot_histogram={r: hot_hist[r].tolist() for r in RULES},
        hot_tensors=hot_tensors,
        block_counts={r: {b: v.tolist() for b, v in block_counts[r].items()} for r in RULES},
        block_sizes=dict(block_sizes),
    )


@dataclass
class OverlapResult:
    global_: dict[str, dict]
    per_tensor: list[dict]


def analyze_overlap(
    base: TensorSource, run1: TensorSource, run2: TensorSource, rules: ChangeRules = ChangeRules(),
    device: str = "cpu", progress: bool = True, view_dtype: str | None = None,
) -> OverlapResult:
    """Overlap of the subnetworks two runs changed from one base, globally and per tensor (all three
    rounded to `view_dtype` when given)."""
    view = view_of(view_dtype)
    names1, names2 = set(run1.names()), set(run2.names())
    names = [n for n in base.names() if n in names1 and n in names2]
    if not names:
        raise SubnetscopeError("the base and the two runs share no tensor names")
    totals = {r: [0, 0, 0] for r in RULES}
    numel = 0
    per_tensor = []
    for name in tqdm(names, desc="overlap", unit="tensor", disable=not progress):
        theta0 = at_view(base.get(name).to(device), view)
        m1 = changed_masks(theta0, at_view(run1.get(name).to(device), view), rules)
        m2 = changed_masks(theta0, at_view(run2.get(name).to(device), view), rules)
        n = theta0.numel()
        numel += n
        row = {"name": name, "numel": n}
        for r in RULES:
            c = torch.stack([m1[r].sum(), m2[r].sum(), (m1[r] & m2[r]).sum()]).tolist()
            for i in range(3):
                totals[r][i] += c[i]
            for key, value in overlap(c[0], c[1], c[2], n).items():
                row[f"{r}_{key}"] = value
        per_tensor.append(row)
    global_ = {r: overlap(*totals[r], numel) for r in RULES}
    return OverlapResult(global_, per_tensor)


def iter_block_table(pair: PairResult) -> Iterable[dict]:
    """Per text block, then `outside` (embeddings, final norm, ...) of the text model: a multimodal
    checkpoint's vision and audio towers are in `PairResult.towers`, not here."""
    per_block = pair.group("block", TEXT_TOWER)
    for blk in sorted(per_block, key=lambda b: (b is None, b if b is not None else 0)):
        g = per_block[blk]
        yield {"block": "outside" if blk is None else blk, **g,
               **{f"{r}_fraction": g[r] / g["numel"] if g["numel"] else 0.0 for r in RULES}}
