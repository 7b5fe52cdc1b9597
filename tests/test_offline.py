"""Hub loads without a network: one probe per process, the local cache, one error line, no retries."""
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from subnetscope import hub
from subnetscope.errors import SubnetscopeError
from subnetscope.models import (
    load_causal_lm,
    load_tokenizer,
    tiny_model,
    word_tokenizer,
)
from subnetscope.rewards import ClassifierReward

ROOT = Path(__file__).resolve().parents[1]
MISSING = "no-such-org/no-such-model"


@pytest.fixture
def no_network(monkeypatch):
    """No offline variables, huggingface_hub's switch off (restored after the test), a fresh probe cache,
    and a record of every name lookup (there must be none): a lookup fails at once, not after retries."""
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lookups: list = []

    def refuse(host, *args, **kwargs):
        lookups.append(host)
        raise RuntimeError(f"a test tried to reach {host}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    hub._probed_offline_reason.cache_clear()
    yield lookups
    hub._probed_offline_reason.cache_clear()


@pytest.fixture
def unreachable(monkeypatch, no_network):
    """The probe answers "unreachable"; `calls` counts how often it ran."""
    calls: list[tuple[str, float]] = []

    def probe(endpoint: str, timeout: float) -> bool:
        calls.append((endpoint, timeout))
        return False

    monkeypatch.setattr(hub, "hub_reachable", probe)
    return calls


def test_missing_model_tokenizer_and_reward_model_probe_once_and_name_the_alternative(unreachable, no_network):
    with pytest.raises(SubnetscopeError) as tok_err:
        load_tokenizer(MISSING)
    with pytest.raises(SubnetscopeError) as model_err:
        load_causal_lm(MISSING, torch.float32)
    with pytest.raises(SubnetscopeError) as reward_err:
        ClassifierReward(MISSING, "cpu")
    assert unreachable == [(constants.ENDPOINT, hub.PROBE_TIMEOUT_S)]  # one probe for the three loads
    assert no_network == []
    cause = f"the Hugging Face Hub at {constants.ENDPOINT} cannot be reached, and it is not in the local"
    for err in (tok_err, model_err, reward_err):
        assert "\n" not in str(err.value) and cause in str(err.value) and MISSING in str(err.value)
    assert "--policy tiny-gpt2 / tiny-gemma3n" in str(tok_err.value)
    assert "--policy tiny-gpt2 / tiny-gemma3n" in str(model_err.value)
    assert "--reward vader" in str(reward_err.value)


def test_random_shaped_policy_names_the_shared_tokenizer_folder(unreachable):
    with pytest.raises(SubnetscopeError, match=r"'gpt2'.*--tokenizer \(\.\./shared/models/tiny-gpt2 has GPT-2's\)"):
        load_tokenizer("random-gpt2-medium")


@pytest.mark.parametrize("var, value", [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "yes")])
def test_offline_variable_is_honoured_without_probing(monkeypatch, unreachable, var, value):
    monkeypatch.setenv(var, value)
    assert hub.offline_reason() == f"{var} is set"
    with pytest.raises(SubnetscopeError, match=f"cannot load model '{MISSING}' \\({var} is set, and it is not"):
        load_causal_lm(MISSING, torch.float32)
    assert unreachable == []


def cached_repo(cache: Path, repo_id: str) -> Path:
    """A Hub cache entry laid out as huggingface_hub writes it: refs/main names a snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_offline_loads_a_cached_model_without_any_request(tmp_path, monkeypatch, unreachable, no_network):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = cached_repo(tmp_path / "hub", "some-org/cached-tiny")
    model, tok = tiny_model("gpt2", seed=3, vocab_size=len(word_tokenizer())), word_tokenizer()
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    loaded = load_causal_lm("some-org/cached-tiny", torch.float32)
    assert load_tokenizer("some-org/cached-tiny").get_vocab() == tok.get_vocab()
    assert all(torch.equal(p, loaded.state_dict()[n]) for n, p in model.state_dict().items())
    assert no_network == [] and len(unreachable) == 1
    assert constants.HF_HUB_OFFLINE  # so that the Hub's own requests (agent registry, adapter lookup) stay off


def test_local_folder_is_not_probed(tmp_path, unreachable):
    tiny_model("gpt2", vocab_size=len(word_tokenizer())).save_pretrained(tmp_path / "m")
    assert load_causal_lm(str(tmp_path / "m"), torch.float32).config.n_layer == 2
    assert unreachable == []


def test_probe_true_for_a_server_that_answers_false_for_a_closed_port(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to HEAD
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub.hub_reachable(f"http://127.0.0.1:{server.server_port}", 5.0)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not hub.hub_reachable(f"http://127.0.0.1:{closed}", 5.0)


@pytest.mark.slow
def test_ppo_default_policy_offline_is_one_line(tmp_path):
    """main_ppo.py with its default Hub policy (gpt2-medium), no offline variable, and a Hub endpoint that
    refuses connections (so that a machine with a network downloads nothing) and an empty cache."""
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARS}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, str(ROOT / "main_ppo.py"), "--device", "cpu", "--max_steps", "1",
                             "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "Retry" not in result.stderr, result.stderr
    assert "'gpt2-medium'" in lines[0] and "cannot be reached" in lines[0]
    assert "--policy tiny-gpt2 / tiny-gemma3n" in lines[0]
    assert not (tmp_path / "run").exists()
