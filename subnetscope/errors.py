"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class SubnetscopeError(Exception):
    """An error caused by the user's input; its message says what is wrong and what to do."""


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
