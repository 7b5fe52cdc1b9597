"""Hugging Face Hub loads that fail fast offline.

Without a network, transformers retries each file five times with backoff (about 25 s and 11 warning
lines per file) before it looks in the local cache. Here the Hub is probed once per process, with a
short timeout; when it cannot be reached (or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set) every load
reads the local cache alone, and a miss is one SubnetscopeError line naming the offline alternative.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any

from huggingface_hub import constants

from .errors import SubnetscopeError

PROBE_TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_reachable(endpoint: str, timeout: float) -> bool:
    """Whether a HEAD to `endpoint` gets any HTTP answer within `timeout` seconds.

    The request runs in a daemon thread that is abandoned on timeout, because name resolution ignores
    socket timeouts; it goes through huggingface_hub's own client, so proxies apply as for real loads."""
    from huggingface_hub.utils import get_session

    finished = threading.Event()
    answered: list[bool] = []

    def head() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # no answer, whatever the reason (name resolution, refused, TLS, timeout)
            pass
        finally:
            finished.set()

    threading.Thread(target=head, name="subnetscope-hub-probe", daemon=True).start()
    finished.wait(timeout)
    return bool(answered)


@functools.cache
def _probed_offline_reason() -> str | None:
    if hub_reachable(constants.ENDPOINT, PROBE_TIMEOUT_S):
        return None
    return f"the Hugging Face Hub at {constants.ENDPOINT} cannot be reached"


def offline_reason() -> str | None:
    """Why Hub ids must come from the local cache in this process, or None when the Hub answers.

    The environment variables are read on every call (they may be set after import); the network
    probe runs at most once per process. Offline, huggingface_hub's own switch (what HF_HUB_OFFLINE=1
    sets at import) is turned on for the rest of the process, so that the requests it and transformers
    make on their own (a user-agent registry, a PEFT adapter lookup that ignores local_files_only) are
    not made, nor retried."""
    reason = next((f"{var} is set" for var in OFFLINE_VARS
                   if os.environ.get(var, "").upper() in constants.ENV_VARS_TRUE_VALUES), None)
    reason = reason or _probed_offline_reason()
    if reason is not None:
        constants.HF_HUB_OFFLINE = True
    return reason


def from_hub(cls: Any, spec: str, what: str, hint: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(spec, **kwargs)` for a folder or Hub id; offline, from the local cache alone.

    A failure is one SubnetscopeError line: "cannot load <what> <spec> (<why>); offline, <hint>"."""
    reason = None if os.path.isdir(spec) else offline_reason()
    if reason is not None:
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(spec, **kwargs)
    except OSError as err:
        why = f"{reason}, and it is not in the local Hugging Face cache" if reason else str(err).splitlines()[0][:120]
        raise SubnetscopeError(f"cannot load {what} {spec!r} ({why}); offline, {hint}") from None
