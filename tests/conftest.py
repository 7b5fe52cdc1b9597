"""Fixtures: tiny models saved the way users save them, and planted deltas with known counts."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_GPT2_DIR = SHARED / "models" / "tiny-gpt2"
IMDB_JSONL = SHARED / "data" / "imdb" / "train.jsonl.gz"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

# the engine's GPU paths are tested where a GPU is (on the lent H100), skipped in CPU-only CI
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


def kill_when_exists(command: list[str], cwd: Path, marker: Path, timeout: float = 120,
                     env: dict | None = None) -> None:
    """Start `command`, SIGKILL it as soon as `marker` exists (a checkpoint folder): a killed run."""
    proc = subprocess.Popen([sys.executable, *command], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# what runs side by side adds to its environment: two 2-thread torch processes on CI's 2 cores spin against each
# other (measured: two tiny main_prune.py runs took 53 s side by side, 15 s with one thread each, 14 s for one alone)
SIDE_BY_SIDE = {"OMP_NUM_THREADS": "1"}


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Call each (each starts and waits for subprocesses) at the same time; their results in order. A tiny run's
    process spends most of its time importing torch on one core, so independent runs side by side (SIDE_BY_SIDE
    in their environment where they train) use CI's two."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def requires_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} (../shared) is not beside the checkout")


def plant(state: dict[str, torch.Tensor], counts: dict[str, int], seed: int = 0,
          scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Copy `state` and change exactly counts[name] entries of each named tensor by a large relative step."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    for name, k in counts.items():
        flat = out[name].view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[:k]
        old = flat[idx].float()
        flat[idx] = (old + scale * (old.abs() + 0.1)).to(flat.dtype)
    return out


def save_state(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def tiny_gpt2_pair(tmp_path):
    """A bf16 tiny GPT-2 saved sharded (index json) and a copy with known changed counts."""
    from subnetscope.models import tiny_model

    model = tiny_model("gpt2", vocab_size=64, n_layer=3).to(torch.bfloat16)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="20KB")
    state = {k: v.detach() for k, v in model.state_dict().items() if "lm_head" not in k}
    counts = {"transformer.h.1.attn.c_attn.weight": 37, "transformer.h.1.mlp.c_fc.weight": 100,
              "transformer.h.2.ln_1.weight": 5, "transformer.wte.weight": 11}
    tuned = save_state(tmp_path / "tuned", plant(state, counts))
    return base, tuned, counts, state


@contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` for the block (e.g. "ro,size=1m" for a read-only location, "size=4m" for a
    full disk); root writes into chmod-read-only folders, not into read-only mounts. Skips where mount is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
