"""Language-model training pieces shared by the pruning run and the sparse fine-tuning run:
seeded random windows of a token stream, the next-token loss, and the held-out loss."""
from __future__ import annotations

import torch


def sample_windows(tokens: torch.Tensor, batch_size: int, block_size: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets) from random windows; the seed fixes them, so a resumed run sees
    the same batches."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=gen)
    rows = torch.stack([tokens[s: s + block_size + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: str) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; bf16 autocast on a GPU."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        logits = model(input_ids=inputs.to(device), use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, block_size: int, batches: int,
                 device: str, seed: int) -> float:
    """Mean loss over `batches` fixed windows of held-out tokens (the same windows every call)."""
    model.eval()
    losses = [float(lm_loss(model, *sample_windows(tokens, batch_size, block_size, seed=seed + i), device))
              for i in range(batches)]
    model.train()
    return sum(losses) / len(losses)
