"""The one place a device spec (auto, cpu, cuda, cuda:N) becomes a device, with a one-line error."""
from __future__ import annotations

import torch

from .errors import SubnetscopeError


def resolve_device(spec: str, auto: str | None = None) -> str:
    """`spec` checked and resolved; "auto" means `auto` when given (a trainer's own device), else a
    GPU when one is visible."""
    if spec == "auto":
        return auto or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SubnetscopeError(f"device {spec} was asked for but no CUDA GPU is visible: use cpu")
    try:
        torch.device(spec)
    except RuntimeError:
        raise SubnetscopeError(f"device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    return spec
