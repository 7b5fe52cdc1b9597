"""Experiment 1B, spatial patterns: where inside each weight matrix the changes fall, and whether the next
step's changes can be foreseen.

Over a run's checkpoints θ_1 … θ_T after its base θ0, transition t compares θ_{t-1} with θ_t under one rule
(at a view dtype when given). Per weight, its change frequency is the share of the T transitions at which
it changed; a weight is hot when that share is above one half. Per matrix: the frequency map (the counts
themselves, and a block-averaged picture), its hot weights, and for attention weights each head's share of
the matrix's changes against its share of the entries (ratio_to_uniform, as for the MatFormer shells: 1 =
no head preferred).

Prediction: the changed set of transition t+1 against what was known at checkpoint t:
  previous    the weights changed at transition t;
  ever        the weights changed at any transition up to t;
  hot_so_far  the weights changed at more than half of transitions 1..t;
  grad_ema    per matrix, the k weights with the largest gradient EMA in the optimizer state saved with
              checkpoint t (ASPG's EMA of |grad|, else Adam's EMA of grad², which ranks alike as its root),
              k = that matrix's changes at transition t (the size `previous` predicts, known at t).
Precision = hits / predicted and recall = hits / changed, each beside chance, a random set of the same
size: precision = the density of the changed set, recall = the density of the predicted set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .changes import ChangeRules, changed_masks
from .checkpoint import TRAINER_STATE, TensorSource
from .engine import at_view, view_of
from .errors import SubnetscopeError, warn
from .metrics import gini
from .naming import block_index, head_units, module_type, tower

HOT = 0.5
MAP_SIZE = 128  # the largest side of a matrix's picture (block averages of its frequencies)
PREDICTORS = ("previous", "ever", "hot_so_far", "grad_ema")
SCORE_KEYS = (("importance", "ASPG's EMA of |grad|"),
              ("exp_avg_sq", "Adam's EMA of grad² (ranks as the EMA of |grad|'s root would)"))


class OptimizerScores:
    """The per-weight gradient EMA of one checkpoint's optimizer state (trainer_state.pt, memory-mapped),
    by parameter name: the optimizer's parameters are the policy's, in `named_parameters` order, which
    run_config.json's "parameters" records."""

    def __init__(self, path: Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]]):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            optimizer = state["optimizer"]
            ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        except Exception as err:  # a cut archive, or a file of another kind
            raise SubnetscopeError(f"{path} is not a readable trainer state ({err}): delete that step folder "
                                   "or leave it out with --max_step / --step_interval") from None
        self.source: str | None = None
        self.scores: dict[str, torch.Tensor] = {}
        for i in ids:
            if i >= len(names):  # a trainer's own modules after the policy (PPO's value head)
                continue
            entry = optimizer["state"].get(i, {})
            for key, label in SCORE_KEYS:
                value = entry.get(key)
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shapes[names[i]]):
                    self.scores[names[i]] = value
                    self.source = self.source or label
                    break

    def get(self, name: str) -> torch.Tensor | None:
        return self.scores.get(name)


def load_scores(run_dir: Path, folders: Sequence[Path]) -> tuple[list[OptimizerScores | None], str | None]:
    """Each checkpoint's gradient EMA (None where its folder has no trainer_state.pt) and what it is."""
    config_path = run_dir / "run_config.json"
    if not config_path.is_file():
        return [None] * len(folders), None
    try:
        parameters = json.loads(config_path.read_text()).get("parameters") or {}
    except (json.JSONDecodeError, AttributeError):
        raise SubnetscopeError(f"{config_path} is not a JSON object: the run folder is damaged") from None
    names = list(parameters)
    shapes = {n: tuple(s) for n, s in parameters.items()}
    found = [OptimizerScores(f / TRAINER_STATE, names, shapes) if (f / TRAINER_STATE).is_file() else None
             for f in folders]
    sources = {s.source for s in found if s is not None and s.source}
    return found, (sources.pop() if len(sources) == 1 else ", ".join(sorted(sources)) or None)


def head_dim_of(config: dict) -> int | None:
    """Attention head width from a model's config.json (a multimodal one's text_config): head_dim, else the
    hidden size over the number of heads; None when the config says neither."""
    text = config.get("text_config") or config
    if text.get("head_dim"):
        return int(text["head_dim"])
    hidden = text.get("hidden_size") or text.get("n_embd")
    heads = text.get("num_attention_heads") or text.get("n_head")
    return int(hidden) // int(heads) if hidden and heads else None


@dataclass
class Tally:
    """Prediction counts of one predictor at one transition, summed over matrices."""

    predicted: int = 0
    hits: int = 0
    changed: int = 0
    numel: int = 0

    def row(self) -> dict:
        n = self.numel
        return {"predicted": self.predicted, "hits": self.hits, "changed": self.changed, "weights": n,
                "precision": self.hits / self.predicted if self.predicted else None,
                "recall": self.hits / self.changed if self.changed else None,
                "chance_precision": self.changed / n if n else None,
                "chance_recall": self.predicted / n if n else None,
                "lift": (self.hits / self.predicted) / (self.changed / n) if self.predicted and self.changed else None}


@dataclass
class PatternResult:
    steps: list[int]
    rule: str
    view_dtype: str | None
    head_dim: int | None
    numel: int = 0
    matrices: list[dict] = field(default_factory=list)
    heads: list[dict] = field(default_factory=list)
    hot: list[dict] = field(default_factory=list)
    hot_total: int = 0
    histogram: list[int] = field(default_factory=list)
    prediction: dict[tuple[int, str], Tally] = field(default_factory=dict)
    grad_ema_source: str | None = None
    pictures: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def transitions(self) -> int:
        return len(self.steps)

    def prediction_rows(self) -> list[dict]:
        """Per transition (labelled by the step it ends at) and predictor, then each predictor over all."""
        order = sorted(self.prediction.items(), key=lambda kv: (kv[0][0], PREDICTORS.index(kv[0][1])))
        rows = [{"step": self.steps[t - 1], "transition": t, "predictor": p, **tally.row()} for (t, p), tally in order]
        return rows + [{"step": "all", "transition": "all", "predictor": p, **tally.row()}
                       for p, tally in self.prediction_totals().items()]

    def prediction_totals(self) -> dict[str, Tally]:
        totals: dict[str, Tally] = {}
        for (_, p), tally in sorted(self.prediction.items(), key=lambda kv: PREDICTORS.index(kv[0][1])):
            total = totals.setdefault(p, Tally())
            total.predicted += tally.predicted
            total.hits += tally.hits
            total.changed += tally.changed
            total.numel += tally.numel
        return totals


def _tally(predicted: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Predicted, hit and changed counts of one matrix (on its device: one host sync for all predictors)."""
    return torch.stack([predicted.sum(), (predicted & changed).sum(), changed.sum()])


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries of largest score (ties broken by position) as a boolean mask of score's shape."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[score.reshape(-1).float().topk(min(k, score.numel())).indices] = True
    return mask.view(score.shape)


def _count_dtype(transitions: int) -> torch.dtype:
    return torch.uint8 if transitions <= 255 else torch.int16 if transitions < 2**15 else torch.int32


def _picture(frequency: torch.Tensor) -> torch.Tensor:
    rows, cols = frequency.shape
    size = (min(rows, MAP_SIZE), min(cols, MAP_SIZE))
    return torch.nn.functional.adaptive_avg_pool2d(frequency[None, None].float(), size)[0, 0].cpu()


def _head_rows(name: str, counts: torch.Tensor, transitions: int, head_dim: int | None) -> list[dict]:
    """Per attention head: its entries, changes, hot weights and share of the matrix's changes."""
    layout = head_units(name, tuple(counts.shape), head_dim) if head_dim else None
    if layout is None:
        return []
    axis, units = layout
    units = units.to(counts.device)
    other = counts.shape[1 - axis]
    along = counts.long().sum(dim=1 - axis)
    hot_along = (counts.long() * 2 > transitions).sum(dim=1 - axis)
    n_heads = int(units.max()) + 1
    changes = torch.bincount(units, weights=along.double(), minlength=n_heads).tolist()
    hot = torch.bincount(units, weights=hot_along.double(), minlength=n_heads).tolist()
    entries = (torch.bincount(units, minlength=n_heads) * other).tolist()
    total_changes, total_entries = sum(changes), sum(entries)
    rows = []
    for h in range(n_heads):
        share = changes[h] / total_changes if total_changes else None
        rows.append({"name": name, "block": block_index(name), "module": module_type(name), "head": h,
                     "entries": entries[h], "changes": int(changes[h]), "hot_weights": int(hot[h]),
                     "mean_frequency": changes[h] / (entries[h] * transitions) if entries[h] else 0.0,
                     "share_of_changes": share, "share_of_entries": entries[h] / total_entries,
                     "ratio_to_uniform": share / (entries[h] / total_entries) if share is not None else None})
    return rows


def _hot_rows(name: str, counts: torch.Tensor, transitions: int, limit: int) -> tuple[list[dict], int]:
    """The matrix's hot weights (at most `limit`, most frequent first) and how many there are."""
    flat = counts.reshape(-1).long()
    hot = (flat * 2 > transitions).nonzero().squeeze(1)
    total = hot.numel()
    if total > limit:
        hot = hot[flat[hot].topk(limit).indices]
    values = flat[hot].tolist()
    indices = hot.tolist()
    positions = list(zip(*(axis.tolist() for axis in torch.unravel_index(hot, tuple(counts.shape))))) if counts.dim() \
        else [()] * len(indices)
    rows = [{"name": name, "index": index, "position": "x".join(map(str, position)), "times_changed": value,
             "frequency": value / transitions}
            for index, position, value in zip(indices, positions, values)]
    return sorted(rows, key=lambda r: (-r["times_changed"], r["index"])), total


def _matrix_row(name: str, counts: torch.Tensor, transitions: int, hot_total: int, heads: list[dict]) -> dict:
    c = counts.long()
    numel = c.numel()
    changes = int(c.sum())
    head_freq = [h["mean_frequency"] for h in heads]
    ratios = [h["ratio_to_uniform"] for h in heads if h["ratio_to_uniform"] is not None]
    return {"name": name, "block": block_index(name), "module": module_type(name), "tower": tower(name),
            "shape": "x".join(map(str, counts.shape)), "numel": numel, "transitions": transitions,
            "changes": changes, "mean_frequency": changes / (numel * transitions) if numel else 0.0,
            "max_frequency": int(c.max()) / transitions if numel else 0.0,
            "never_changed": int((c == 0).sum()) / numel if numel else 0.0,
            "always_changed": int((c == transitions).sum()) / numel if numel else 0.0,
            "hot_weights": hot_total, "hot_fraction": hot_total / numel if numel else 0.0,
            "heads": len(heads) or None, "head_gini": gini(head_freq) if heads else None,
            "max_head_ratio": max(ratios) if ratios else None}


@dataclass(frozen=True)
class PatternSettings:
    rules: ChangeRules
    rule: str
    device: str = "cpu"
    view_dtype: str | None = None
    head_dim: int | None = None
    max_hot: int = 10000
    keep_counts: bool = True
    progress: bool = True


def analyze_patterns(base: TensorSource, checkpoints: Sequence[tuple[int, TensorSource]],
                     scores: Sequence[OptimizerScores | None], settings: PatternSettings) -> PatternResult:
    """Change frequencies, hot weights, head shares and next-step predictability over a run's checkpoints,
    tensor by tensor (every checkpoint's copy of one tensor, then the next: memory stays a few tensors plus
    one count per weight when the map is kept). `scores[i]` is checkpoint i's optimizer state, or None."""
    if len(checkpoints) < 2:
        raise SubnetscopeError("spatial patterns need at least two step checkpoints (two transitions after θ0): "
                               "save more often (--save_every) or lower --step_interval")
    view = view_of(settings.view_dtype)
    steps = [s for s, _ in checkpoints]
    sources = [src for _, src in checkpoints]
    T = len(sources)
    result = PatternResult(steps, settings.rule, settings.view_dtype, settings.head_dim, histogram=[0] * (T + 1))
    name_sets = [set(s.names()) for s in sources]
    names = [n for n in base.names() if all(n in names_ for names_ in name_sets)]
    if not names:
        raise SubnetscopeError("the base and the checkpoints share no tensor names")
    dev = torch.device(settings.device)
    hot_rows: list[dict] = []
    for name in tqdm(names, desc="patterns", unit="tensor", disable=not settings.progress):
        shapes = {tuple(base.shape(name))} | {tuple(s.shape(name)) for s in sources}
        if len(shapes) != 1:
            result.notes.append(f"{name}: shape changes across the run {sorted(shapes)}; left out")
            warn(result.notes[-1])
            continue
        counts = _tensor_patterns(name, base, sources, scores, settings, view, dev, result)
        result.numel += counts.numel()
        histogram = torch.bincount(counts.reshape(-1).long(), minlength=T + 1).tolist()
        result.histogram = [a + b for a, b in zip(result.histogram, histogram)]
        heads = _head_rows(name, counts, T, settings.head_dim)
        result.heads.extend(heads)
        hot, hot_total = _hot_rows(name, counts, T, settings.max_hot)
        hot_rows = _most_frequent(hot_rows + hot, settings.max_hot)
        result.hot_total += hot_total
        result.matrices.append(_matrix_row(name, counts, T, hot_total, heads))
        if counts.dim() == 2:
            result.pictures[name] = _picture(counts.float() / T)
        if settings.keep_counts:
            result.counts[name] = counts.cpu()
    result.hot = hot_rows
    return result


def _most_frequent(rows: list[dict], limit: int) -> list[dict]:
    return sorted(rows, key=lambda r: (-r["times_changed"], r["name"], r["index"]))[:limit]


def _tensor_patterns(name: str, base: TensorSource, sources: Sequence[TensorSource],
                     scores: Sequence[OptimizerScores | None], settings: PatternSettings, view, dev: torch.device,
                     result: PatternResult) -> torch.Tensor:
    """One tensor's change counts over the transitions; its prediction tallies go into `result`."""
    T = len(sources)
    previous = at_view(base.get(name).to(dev), view)
    counts = torch.zeros(previous.shape, dtype=_count_dtype(T), device=dev)
    last: torch.Tensor | None = None
    numel = previous.numel()
    for t, src in enumerate(sources, start=1):
        current = at_view(src.get(name).to(dev), view)
        changed = changed_masks(previous, current, settings.rules)[settings.rule]
        if last is not None:
            predictions = {"previous": last, "ever": counts > 0, "hot_so_far": counts.long() * 2 > t - 1}
            held = scores[t - 2] if scores else None  # the optimizer state saved with checkpoint t-1
            score = held.get(name) if held is not None else None
            if score is not None:
                predictions["grad_ema"] = topk_mask(score.to(dev), int(last.sum()))
            tallies = torch.stack([_tally(p, changed) for p in predictions.values()]).tolist()
            for key, (predicted, hits, target) in zip(predictions, tallies):
                tally = result.prediction.setdefault((t, key), Tally())
                tally.predicted += predicted
                tally.hits += hits
                tally.changed += target
                tally.numel += numel
        counts += changed.to(counts.dtype)
        last = changed
        previous = current
    return counts
