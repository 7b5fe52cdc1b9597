"""Per-step metrics: always to run/metrics.jsonl, to Weights & Biases with --wandb PROJECT.

Each line is flushed to disk as it is written; a resumed run rewrites the file (without the steps
after its checkpoint) through a temporary file and a rename, so a kill never leaves it empty.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import SubnetscopeError, warn

WANDB_HELP = "run `wandb login` (or set WANDB_API_KEY), or log offline with WANDB_MODE=offline"


def _wandb_has_credentials(settings) -> bool:
    """wandb's own lookup (WANDB_API_KEY, ~/.netrc, its settings file), without the network; True
    where this wandb has no such lookup (then wandb.init says what is missing)."""
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:
        try:
            from wandb.sdk.lib import apikey
        except ImportError:
            return True
        return bool(apikey.api_key(settings=settings))
    auth = wbauth.authenticate_session(host=settings.base_url, source="subnetscope", prompt=False,
                                       update_session=False)
    return auth is not None


def check_wandb(project: str | None) -> None:
    """--wandb PROJECT needs wandb and a login, or an offline/disabled WANDB_MODE: checked before a
    run writes anything, instead of a traceback from wandb.init after its folder is made."""
    if not project:
        return
    try:
        from wandb.sdk import wandb_setup
    except ImportError:
        raise SubnetscopeError("--wandb needs the wandb package: pip install wandb") from None
    try:
        settings = wandb_setup.singleton().settings
        if settings._offline or settings._noop:
            return
        found = _wandb_has_credentials(settings)
    except Exception as err:  # wandb's AuthenticationError / UsageError: a malformed key or settings file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SubnetscopeError(f"--wandb {project}: {first}: {WANDB_HELP}") from None
    if not found:
        raise SubnetscopeError(f"--wandb {project}: not logged in to Weights & Biases: {WANDB_HELP}")


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
            check_wandb(wandb_project)
            import wandb

            try:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir),
                                         name=run_dir.name, resume="allow", id=_run_id(run_dir))
            except Exception as err:  # wandb's errors carry the useful text in their first line
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise SubnetscopeError(f"--wandb {wandb_project}: wandb.init failed ({first}): {WANDB_HELP}") from None

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so drop their old lines (and a line
        a kill cut short), through a fsync'd temporary file and a rename."""
        if not self.path.exists():
            return
        from .rundir import durable_write_text

        records = read_metrics(self.path, note=True)
        keep = [r for r in records if r.get("step", 0) <= step]
        if len(keep) < len(records) or self.path.read_bytes()[-1:] not in (b"", b"\n"):
            durable_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path, note: bool = False) -> list[dict]:
    """The records of a metrics.jsonl, in order. A last line a kill cut short is left out (with a
    warning when `note`); an unreadable line elsewhere is refused in one line naming the file."""
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == len(lines) - 1:
            if note:
                warn(f"{path}: dropped its last line, cut short when the run was killed while writing it")
        else:
            raise SubnetscopeError(f"{path} line {i + 1} is not a JSON record: the file is damaged; "
                                   "restore it or delete that line")
    return records


def _run_id(run_dir: Path) -> str:
    """A stable W&B id per run folder, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
