"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Iterable, Sequence, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class SubnetscopeError(Exception):
    """An error caused by the user's input; its message says what is wrong and what to do."""


# Issue 18, one spelling per concept: the model a command fine-tunes, scores or benchmarks is --policy; the
# weights θ0 a run is compared against are --base (--bases: one per run); a saved model to inspect is
# --checkpoint. Each old spelling, with the spellings that replaced it (a command has at most one of them).
RENAMED = {"--model": ("--policy", "--base", "--bases"), "--model_path": ("--policy",),
           "--models": ("--bases",), "--model_dir": ("--checkpoint",)}


def refuse_renamed(given: Iterable, known: Iterable[str], keys: bool = False, where: str = "") -> None:
    """One line for the first of `given` that is an old spelling of one of `known`, naming the new one: flags
    (`--x` or `--x=value`), or with `keys` YAML keys (the flags' names without their dashes)."""
    dashes = "--" if keys else ""
    known = {dashes + k for k in known}
    for token in given:
        old = dashes + str(token).split("=", 1)[0]
        new = None if old in known else next((n for n in RENAMED.get(old, ()) if n in known), None)
        if new:
            raise SubnetscopeError(f"{where}{old.removeprefix(dashes)} is now {new.removeprefix(dashes)}")


class ArgumentParser(argparse.ArgumentParser):
    """The commands' parser: an old spelling of a flag this command has is refused in one line naming the new
    one, before anything else is parsed (no hidden alias keeps the old one working)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        refuse_renamed(sys.argv[1:] if args is None else args, self._option_string_actions)
        return super().parse_known_args(args, namespace)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cli_main(func: F) -> F:
    """Wrap a CLI entry point so that input errors become one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SubnetscopeError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
