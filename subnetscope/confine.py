"""Updates confined to a mask: fine-tune only a subnetwork, or keep a pruned model pruned.

Masking the gradient is not enough: weight decay and optimizer state (Adam's moments from earlier
steps) still move entries outside the mask. So after every optimizer step the weights outside the
mask are put back onto their anchor, θ ← anchor + M⊙(θ − anchor), with anchor = θ0 for
subnetwork-only fine-tuning and 0 for a pruned model. Subnetwork-only fine-tuning also holds the tensors
the mask does not cover (embeddings, norms, biases of a compute_masks.py mask) at θ0, unless asked not to.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .changes import RULES, ChangeRules
from .checkpoint import open_checkpoint
from .engine import analyze_pair


def trainable_weights(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None,
                      train_unmasked: bool = False) -> int:
    """Weights an update may change: all without a mask; else the mask's ones, plus every entry of the
    tensors it does not cover when those are trained too."""
    if masks is None:
        return sum(p.numel() for p in params.values())
    unmasked = sum(p.numel() for n, p in params.items() if n not in masks) if train_unmasked else 0
    return sum(int(m.sum()) for m in masks.values()) + unmasked


class ConfinedUpdates:
    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 anchors: dict[str, torch.Tensor] | None = None, freeze_unmasked: bool = False):
        """`anchors[name]` holds the values outside the mask (None: zero). With `freeze_unmasked`, every
        parameter the mask does not name gets no update and stays at its anchor (anchors required)."""
        if freeze_unmasked and anchors is None:
            raise ValueError("freeze_unmasked needs anchors to hold the unmasked tensors at")
        self.entries = []
        for name, mask in masks.items():
            p = params[name]
            anchor = anchors[name] if anchors is not None else None
            self.entries.append((p, mask.to(p.device), anchor))
        self.frozen = [(params[n], anchors[n]) for n in params if n not in masks] if freeze_unmasked else []

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Call after backward and before clipping, so the clipped norm is the subnetwork's."""
        for p, mask, _ in self.entries:
            if p.grad is not None:
                p.grad.masked_fill_(~mask, 0)
        for p, _ in self.frozen:
            p.grad = None  # skipped by the optimizer and by clipping, weight decay included

    @torch.no_grad()
    def project_(self) -> None:
        """Call after optimizer.step(): entries outside the mask back to the anchor, bit for bit."""
        for p, mask, anchor in self.entries:
            if anchor is None:
                p.masked_fill_(~mask, 0)
            else:
                p.copy_(torch.where(mask, p, anchor))
        for p, anchor in self.frozen:
            p.copy_(anchor)


def _final_metrics(run_dir: Path) -> dict:
    from .logger import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    last = records[-1] if records else {}
    greedy = next((r["eval/greedy/reward"] for r in reversed(records) if "eval/greedy/reward" in r), None)
    return {"step": last.get("step"), "reward": last.get("reward/mean"), "eval_greedy_reward": greedy}


def compare_with_full_run(run_dir: Path, full_run: Path, rules: ChangeRules, device: str = "cpu") -> dict:
    """Fraction of weights identical to the full run's final weights under each rule (the engine's
    comparison of the two final/ folders), and the final rewards of both runs."""
    pair = analyze_pair(open_checkpoint(str(full_run / "final")), open_checkpoint(str(run_dir / "final")), rules,
                        device=device, progress=False)
    return {"full_run": str(full_run), "weights_compared": pair.numel,
            "identical_fraction": {r: 1 - pair.fraction(r) if pair.numel else None for r in RULES},
            "subnetwork_run": _final_metrics(run_dir), "full_run_final": _final_metrics(full_run)}
