"""The batched pass of the engine on a GPU: many tensors per kernel launch.

Compared one at a time, a model's tensors cost a GPU mostly fixed overheads: a few dozen kernel
launches and host syncs per tensor, and GPT-2-medium has 290 tensors, 190 of them small biases and
norms. Here tensors of one dtype are packed into segments of at most SEGMENT_BYTES (a larger
tensor is cut into pieces of whole rows, whose statistics are merged), read from the files into
device buffers through a small ring of pinned chunks while earlier segments are compared, and each
segment costs one bitwise pass, one `nonzero`, per-tensor sums by `segment_reduce` over the changed
entries, and one copy of its results to the host. The rules are `changes.apply_rules`, as for
every other comparison. With a view dtype, each segment is rounded to it on the device right after
its read (both sides, RNE like `.to()`), so the batched pass judges at the view like the
tensor-by-tensor one.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .changes import (
    RULES,
    ChangeRules,
    DiffStats,
    apply_rules,
    changed_indices,
    compute_dtype,
    diff_stats,
    rule_code,
    rule_counts_along,
    thresholded_rules,
)
from .checkpoint import TensorSource, pread_exact
from .metrics import update_rank
from .naming import neuron_axis

SEGMENT_BYTES = 64 << 20
CHUNK_BYTES = 8 << 20
PINNED_CHUNKS = 8
READ_THREADS = 4
SLOT_BUDGET = 1 << 30  # device memory for the segments read ahead (at least two)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Member:
    """One tensor, or a piece of whole rows of one, in a segment: where its bytes are on both
    sides, and where its elements start in the segment."""

    name: str
    shape: tuple[int, ...]
    numel: int
    start: int
    axis: int | None
    base_range: tuple[Path, int, int]
    tuned_range: tuple[Path, int, int]
    pieces: int = 1


@dataclass
class Segment:
    dtype: torch.dtype
    members: list[Member]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def batchable(base: TensorSource, tuned: TensorSource, name: str, rank: bool = False) -> bool:
    """Same float dtype and shape on both sides, raw bytes in a file: the common case. Anything
    else (a resized vocabulary, mixed dtypes, other formats) goes tensor by tensor with its note,
    and so does a matrix whose rank is asked for but that is split across segments."""
    rb, rt = base.byte_range(name), tuned.byte_range(name)
    if rb is None or rt is None:
        return False
    dtype, shape = base.dtype(name), tuple(base.shape(name))
    size = base.numel(name) * dtype.itemsize
    if rank and len(shape) == 2 and size > SEGMENT_BYTES:
        return False
    return (dtype in _FLOATS and dtype == tuned.dtype(name) and shape == tuple(tuned.shape(name)) and size > 0
            and rb[2] - rb[1] == size and rt[2] - rt[1] == size)


def _row_pieces(shape: tuple[int, ...], max_numel: int) -> list[tuple[int, int]]:
    """(first row, rows) of the pieces a tensor is cut into: whole rows (slices of the first axis),
    at most max_numel elements each unless one row is larger."""
    if len(shape) == 0:
        return [(0, 1)]
    rows = shape[0]
    per_row = math.prod(shape[1:])
    step = max(1, max_numel // max(1, per_row))
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def plan_segments(base: TensorSource, tuned: TensorSource, names: Sequence[str],
                  target_bytes: int = SEGMENT_BYTES) -> list[Segment]:
    """Pack the tensors, in the base file's order within each dtype, into segments of about
    `target_bytes`; a larger tensor is cut into pieces of whole rows, so device memory stays
    bounded by the segment size whatever the largest tensor (Gemma-3n's per-layer embeddings: 4 GB)."""
    order = sorted(names, key=lambda n: (str(base.dtype(n)), str(base.byte_range(n)[0]), base.byte_range(n)[1]))
    segments: list[Segment] = []
    for name in order:
        dtype, shape = base.dtype(name), tuple(base.shape(name))
        per_row = math.prod(shape[1:]) if shape else 1
        pieces = _row_pieces(shape, max(1, target_bytes // dtype.itemsize))
        for first, rows in pieces:
            numel = rows * per_row
            seg = segments[-1] if segments else None
            if seg is None or seg.dtype != dtype or (seg.nbytes + numel * dtype.itemsize > target_bytes):
                seg = Segment(dtype, [], 0)
                segments.append(seg)
            lo, hi = first * per_row * dtype.itemsize, (first * per_row + numel) * dtype.itemsize
            ranges = [(path, start + lo, start + hi)
                      for path, start, _ in (base.byte_range(name), tuned.byte_range(name))]
            seg.members.append(Member(name, (rows, *shape[1:]) if shape else (), numel, seg.numel,
                                      neuron_axis(name, shape), *ranges, pieces=len(pieces)))
            seg.numel += numel
    return segments


def merge_pieces(parts: list[DiffStats]) -> DiffStats:
    """One tensor's statistics from those of its pieces (consecutive whole rows): counts and sums
    add, maxima take the max, per-row counts concatenate, per-column counts add."""
    if len(parts) == 1:
        return parts[0]
    out = DiffStats(numel=sum(p.numel for p in parts))
    out.changed = {r: sum(p.changed[r] for p in parts) for r in parts[0].changed}
    for f in ("nonfinite_base", "nonfinite_tuned", "abs_sum", "abs_sq_sum", "base_sq_sum", "finite_count"):
        setattr(out, f, sum(getattr(p, f) for p in parts))
    out.abs_max = max(p.abs_max for p in parts)
    if parts[0].row_changed is not None:
        out.row_changed = {r: torch.cat([p.row_changed[r] for p in parts]) for r in parts[0].row_changed}
        out.col_changed = {r: sum(p.col_changed[r] for p in parts) for r in parts[0].col_changed}
    return out


class RangeReader:
    """Reads byte ranges of files into (device) tensors with a few threads. For a GPU each piece is
    pread into one of a small ring of pinned chunks and copied asynchronously on the thread's own
    stream: a few chunks allocated once instead of pinned buffers the size of the largest tensor."""

    def __init__(self, device: torch.device, threads: int = READ_THREADS):
        self.device, self.cuda = device, device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._free: queue.Queue = queue.Queue()
        self._chunks_made = 0

    def submit(self, path: Path, offset: int, dest: torch.Tensor) -> list[Future]:
        """Start reading len(dest) bytes at `offset` of `path` into the uint8 tensor `dest`."""
        n = dest.numel()
        return [self.pool.submit(self._piece, path, offset + i, dest[i:i + CHUNK_BYTES])
                for i in range(0, n, CHUNK_BYTES)]

    def wait(self, futures: Sequence[Future]) -> None:
        """Block until every piece is read; on a GPU the current stream then waits for the copies."""
        for f in futures:
            event = f.result()
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def _piece(self, path: Path, offset: int, dest: torch.Tensor) -> "torch.cuda.Event | None":
        fd, n = self._fd(path), dest.numel()
        if not self.cuda:
            pread_exact(fd, memoryview(dest.numpy()), offset, str(path))
            return None
        chunk = self._take_chunk()
        try:
            if chunk[1] is not None:
                chunk[1].synchronize()  # the chunk's previous copy has left it
            pread_exact(fd, memoryview(chunk[0].numpy())[:n], offset, str(path))
            if not hasattr(self._local, "stream"):
                self._local.stream = torch.cuda.Stream(device=dest.device)
            with torch.cuda.stream(self._local.stream):
                dest.copy_(chunk[0][:n], non_blocking=True)
                chunk[1] = torch.cuda.Event()
                chunk[1].record(self._local.stream)
            return chunk[1]
        finally:
            self._free.put(chunk)

    def _take_chunk(self) -> list:
        """A free pinned chunk [buffer, event of its last copy]; made on first need (pinning costs
        about 4 ms per 8 MB, so the first read does not wait for the whole ring)."""
        with self._lock:
            if self._free.empty() and self._chunks_made < PINNED_CHUNKS:
                self._chunks_made += 1
                return [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True), None]
        return self._free.get()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def compare_segments(base: TensorSource, tuned: TensorSource, names: Sequence[str], rules: ChangeRules,
                     device: str, rank: bool = False, target_bytes: int | None = None,
                     view: torch.dtype | None = None,
                     ) -> Iterator[tuple[str, DiffStats, tuple[int, int] | None]]:
    """(name, statistics, update rank with `rank`) of every `batchable` tensor, segment by segment;
    the next segments are read while one is compared, into a ring of device buffer pairs. With
    `view`, both sides of a segment are rounded to that dtype before they are compared."""
    segments = plan_segments(base, tuned, names, target_bytes or SEGMENT_BYTES)
    if not segments:
        return
    dev = torch.device(device)
    size = max(s.nbytes for s in segments)
    depth = min(len(segments), max(2, SLOT_BUDGET // (2 * size)))
    slots = [(torch.empty(size, dtype=torch.uint8, device=dev), torch.empty(size, dtype=torch.uint8, device=dev))
             for _ in range(depth)]
    reader = RangeReader(dev)

    def start_reading(k: int) -> list[Future]:
        seg, (buf_a, buf_b) = segments[k], slots[k % depth]
        isz = seg.dtype.itemsize
        futures = []
        for m in seg.members:
            for buf, (path, lo, hi) in ((buf_a, m.base_range), (buf_b, m.tuned_range)):
                futures += reader.submit(path, lo, buf[m.start * isz:m.start * isz + hi - lo])
        return futures

    try:
        pending = {k: start_reading(k) for k in range(depth)}
        pending_pieces: dict[str, list[DiffStats]] = {}
        for k, seg in enumerate(segments):
            reader.wait(pending.pop(k))
            buf_a, buf_b = slots[k % depth]
            a, b = buf_a[:seg.nbytes].view(seg.dtype), buf_b[:seg.nbytes].view(seg.dtype)
            judged = seg
            if view is not None and view != seg.dtype:
                a, b, judged = a.to(view), b.to(view), replace(seg, dtype=view)
            for member, stats, ranks in segment_stats(a, b, judged, rules, rank):  # a host sync: the slot is free again
                parts = pending_pieces.setdefault(member.name, [])
                parts.append(stats)
                if len(parts) == member.pieces:
                    yield member.name, merge_pieces(pending_pieces.pop(member.name)), ranks
            if k + depth < len(segments):
                pending[k + depth] = start_reading(k + depth)
    finally:
        reader.close()


def load_kernels(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, rules: ChangeRules = ChangeRules()) -> None:
    """Run the segment kernels once on a made-up 40-weight segment. A GPU loads each kernel's code
    on its first launch (CUDA lazy loading): about 0.15 s per process for the engine's kernels on
    an H100, mostly hidden behind the first reads; this moves it where it suits (the benchmark)."""
    dev, nowhere = torch.device(device), (Path(), 0, 0)
    members = [Member("model.layers.0.mlp.up_proj.weight", (4, 8), 32, 0, 0, nowhere, nowhere),
               Member("model.layers.0.mlp.up_proj.bias", (8,), 8, 32, None, nowhere, nowhere)]
    a = torch.linspace(-1, 1, 40).to(dtype)
    b = torch.where(torch.arange(40) % 3 == 0, a * 2, a)
    a, b = a.to(dev), b.to(dev)  # made on the CPU: only the segment kernels are loaded here
    for _ in segment_stats(a, b, Segment(dtype, members, 40), rules):
        pass


def _per_member(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Sum (or max) of x over each member's run of entries, runs given by their `offsets`."""
    return torch.segment_reduce(x, reduce, offsets=offsets, unsafe=True, initial=0)


def segment_stats(a: torch.Tensor, b: torch.Tensor, seg: Segment, rules: ChangeRules, rank: bool = False,
                  ) -> Iterator[tuple[Member, DiffStats, tuple[int, int] | None]]:
    """The statistics of every tensor of one segment (flat `a`, `b` hold the members back to back),
    as `changes.diff_stats` computes them for one tensor.

    The changed entries come sorted, so each member's are one run of them, found by a binary
    search of the member boundaries; per-member sums and maxima reduce those runs. The ops are
    few and shared on purpose: a GPU loads each family of kernels on its first use (5-45 ms each).
    A member holding NaN or ±inf is recomputed by `diff_stats` itself, which counts and skips them:
    rare, so its kernels are loaded only when needed. Every such member has a sum that is not finite
    (a base entry makes Σa² NaN or inf; a tuned one the base lacks is changed, so its |Δ| makes Σ|Δ|
    NaN or inf, never cancelled since |Δ| >= 0), and its counts come from `apply_rules` either way."""
    dev, calc, T = a.device, compute_dtype(seg.dtype), len(seg.members)
    bounds = torch.tensor([m.start for m in seg.members] + [seg.numel], device=dev)
    idx = changed_indices(a, b).to(dev)
    runs = torch.searchsorted(idx, bounds)  # member j's changed entries are idx[runs[j]:runs[j + 1]]
    va, vb = a.gather(0, idx).to(calc), b.gather(0, idx).to(calc)
    masks, absd = apply_rules(torch.ones(idx.shape, dtype=torch.bool, device=dev), va, vb, rules)
    absd64, thresholded = absd.double(), thresholded_rules()
    per_member = {  # one copy to the host for all of it
        **{r: _per_member(masks[r].double(), runs) if r in thresholded else runs[1:] - runs[:-1]
           for r in RULES},  # every entry listed is changed under a rule without a threshold (`exact`)
        "abs_max": _per_member(absd, runs, "max"),
        "abs_sum": _per_member(absd64, runs),
        "abs_sq_sum": _per_member(absd64 * absd64, runs),
        "base_sq_sum": _per_member(a.double() * a.double(), bounds),
    }
    summary = torch.empty(len(per_member), T, dtype=torch.float64, device=dev)
    for row, values in zip(summary, per_member.values()):
        row.copy_(values)
    along = _counts_along_neurons(seg, idx, rule_code(masks)) if any(m.axis is not None for m in seg.members) else {}
    for j, (m, column) in enumerate(zip(seg.members, summary.cpu().T.tolist())):
        got = dict(zip(per_member, column))
        if not (math.isfinite(got["abs_sum"]) and math.isfinite(got["base_sq_sum"])):
            stats = diff_stats(a[m.start:m.start + m.numel].view(m.shape), b[m.start:m.start + m.numel].view(m.shape),
                               rules, per_row_col=m.axis is not None, device=str(dev))
        else:
            stats = DiffStats(numel=m.numel, changed={r: int(got[r]) for r in RULES}, abs_max=got["abs_max"],
                              abs_sum=got["abs_sum"], abs_sq_sum=got["abs_sq_sum"], base_sq_sum=got["base_sq_sum"],
                              finite_count=m.numel)
            if j in along:
                stats.row_changed, stats.col_changed = along[j]
        ranks = None
        if rank and len(m.shape) == 2 and m.pieces == 1:
            delta = (b[m.start:m.start + m.numel].float() - a[m.start:m.start + m.numel].float()).view(m.shape)
            ranks = update_rank(delta, str(dev))
        yield m, stats, ranks


def _counts_along_neurons(seg: Segment, idx: torch.Tensor, code: torch.Tensor) -> dict[int, tuple[dict, dict]]:
    """Per-row and per-column changed counts of the segment's FFN matrices (for the MatFormer
    shells). The segment is cut into "rows" (each FFN matrix row, and every other member as one
    long row); a binary search gives each changed entry its row, which is its row slot, and its
    column slot is idx·w + s with w, s looked up per row (w = 0 sends other members' entries to a
    last, discarded slot): no integer division."""
    cols_total = sum(m.shape[1] for m in seg.members if m.axis is not None)
    starts, weight, shift, first_slots = [], [], [], {}
    n_rows = c0 = 0
    for j, m in enumerate(seg.members):
        rows, cols = m.shape if m.axis is not None else (1, 0)
        starts.append(m.start + cols * torch.arange(rows))
        if m.axis is None:
            weight.append(torch.zeros(1, dtype=torch.long))
            shift.append(torch.tensor([cols_total]))
        else:
            weight.append(torch.ones(rows, dtype=torch.long))
            shift.append(c0 - starts[-1])
            first_slots[j] = (n_rows, c0)
            c0 += cols
        n_rows += rows
    dev = idx.device
    row_start = torch.cat(starts).to(dev)
    row = torch.searchsorted(row_start[1:], idx, right=True)
    col = idx * torch.cat(weight).to(dev).gather(0, row) + torch.cat(shift).to(dev).gather(0, row)
    by_row, by_col = rule_counts_along(row, code, n_rows), rule_counts_along(col, code, cols_total + 1)
    out = {}
    for j, (r0, c0) in first_slots.items():
        rows, cols = seg.members[j].shape
        out[j] = ({r: v[r0:r0 + rows] for r, v in by_row.items()}, {r: v[c0:c0 + cols] for r, v in by_col.items()})
    return out
