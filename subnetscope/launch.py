"""How many processes the launcher asked for, to warn when fewer run.

`accelerate launch --cpu --num_processes 2 script.py` starts one process and says nothing: accelerate's
`--cpu` launcher ignores `--num_processes`. Nothing in the process's environment tells it more were
asked for (no WORLD_SIZE), so the launcher's own command line is read (Linux /proc, the parent process).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import warn

NUM_PROCESSES_FLAGS = ("--num_processes", "--num-processes")


def requested_processes(argv: list[str]) -> int | None:
    """`--num_processes N` of an `accelerate launch` command line, or None when it is not one or names none."""
    head = argv[:4]  # python, bin/accelerate (or -m accelerate.commands...), launch
    accelerate = any(Path(a).name == "accelerate" or a.startswith("accelerate.commands") for a in head)
    if not accelerate or not any(a == "launch" or a.endswith(".launch") for a in head):
        return None
    for i, arg in enumerate(argv):
        for flag in NUM_PROCESSES_FLAGS:
            value = arg.removeprefix(f"{flag}=") if arg.startswith(f"{flag}=") else (
                argv[i + 1] if arg == flag and i + 1 < len(argv) else None)
            if value is not None and value.isdigit():
                return int(value)
    return None


def parent_command_line() -> list[str]:
    """The parent process's arguments ([] where /proc cannot tell them)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def launch_mismatch(world_size: int, argv: list[str] | None = None) -> str | None:
    """Why the launch is not what it asked for (one line), or None."""
    asked = requested_processes(parent_command_line() if argv is None else argv)
    if asked is None or asked <= world_size:
        return None
    return (f"accelerate launch asked for {asked} processes (--num_processes {asked}) but {world_size} is running: "
            "accelerate's --cpu launcher starts one process; for several CPU processes use torchrun "
            f"--nproc_per_node {asked} (or accelerate launch --multi_gpu --num_processes {asked}) with --device cpu")


def warn_launch_mismatch(world_size: int, argv: list[str] | None = None) -> bool:
    """Print the warning when the launch asked for more processes than run; whether it did."""
    problem = launch_mismatch(world_size, argv)
    if problem:
        warn(problem)
    return problem is not None
