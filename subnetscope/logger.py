"""Per-step metrics: always to run/metrics.jsonl, to Weights & Biases with --wandb PROJECT."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import SubnetscopeError


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_project: str | None, config: dict, resume_step: int = 0,
                 enabled: bool = True, filename: str = "metrics.jsonl"):
        self.path = run_dir / filename
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise SubnetscopeError("--wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir),
                                     name=run_dir.name, resume="allow", id=_run_id(run_dir))

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so drop their old lines."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _run_id(run_dir: Path) -> str:
    """A stable W&B id per run folder, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
