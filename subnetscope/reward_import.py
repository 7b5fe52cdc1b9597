"""`--reward module:function`: a TRL-style reward callable as the reward of subnetscope's own loops.

TRL's `reward_funcs` take keywords, `f(completions, **kwargs)` or `f(prompts, completions,
completion_ids, **kwargs)`, and return one float (or None) per completion. `module` is an importable
module (the current folder is searched too) or a `.py` file; `function` names a callable in it (a
class is instantiated without arguments). Our loops call it with `prompts=`, `completions=` and
`completion_ids=`; TRL's `trainer_state` and the data set's columns do not exist there.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import SubnetscopeError

SPEC_HINT = "pass --reward module:function (an importable module or a .py file, and a callable in it)"


def _load_module(module: str, spec: str):
    """An importable module, or a `.py` file by path; one line for anything that fails to import."""
    try:
        if module.endswith(".py"):
            path = Path(module).expanduser()
            if not path.is_file():
                raise SubnetscopeError(f"--reward {spec}: {path} does not exist: {SPEC_HINT}")
            found = importlib.util.spec_from_file_location(path.stem, path)
            loaded = importlib.util.module_from_spec(found)
            found.loader.exec_module(loaded)
            return loaded
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        return importlib.import_module(module)
    except SubnetscopeError:
        raise
    except ModuleNotFoundError as err:
        raise SubnetscopeError(f"--reward {spec}: no module named {err.name!r}: {SPEC_HINT}") from None
    except Exception as err:  # the user's module failed while importing
        raise SubnetscopeError(f"--reward {spec}: importing {module} failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}): fix the module") from None


class KeywordReward:
    """A TRL-style reward callable (keywords) as a subnetscope RewardFunction (positional)."""

    def __init__(self, fn: Callable[..., Sequence[Any]], name: str):
        self.fn = fn
        self.name = name

    def __call__(self, prompts, completions, completion_ids) -> list[float | None]:
        values = list(self.fn(prompts=list(prompts), completions=list(completions),
                              completion_ids=[list(ids) for ids in completion_ids]))
        if len(values) != len(completions):
            raise SubnetscopeError(f"--reward {self.name} returned {len(values)} rewards for {len(completions)} "
                                   "completions: return one float (or None) per completion")
        return values


def import_reward(spec: str) -> KeywordReward:
    """The callable `spec` (`module:function`) names, checked before any model is loaded."""
    module, _, attribute = spec.rpartition(":")
    if not module or not attribute:
        raise SubnetscopeError(f"--reward {spec}: {SPEC_HINT}")
    found = getattr(_load_module(module, spec), attribute, None)
    if found is None:
        raise SubnetscopeError(f"--reward {spec}: {module} has no {attribute!r}: {SPEC_HINT}")
    if inspect.isclass(found):
        try:
            found = found()
        except Exception as err:
            raise SubnetscopeError(f"--reward {spec}: {attribute}() failed ({type(err).__name__}: {err}): a class "
                                   "is instantiated without arguments; name a function or an instance") from None
    if not callable(found):
        raise SubnetscopeError(f"--reward {spec}: {attribute} ({type(found).__name__}) is not callable: {SPEC_HINT}")
    try:
        inspect.signature(found).bind(prompts=[], completions=[], completion_ids=[])
    except TypeError:
        raise SubnetscopeError(f"--reward {spec}: {attribute} does not take TRL's keywords (prompts=, completions=, "
                               "completion_ids=): define it as f(completions, **kwargs)") from None
    except ValueError:  # a builtin without a signature: called as it is
        pass
    return KeywordReward(found, spec)
