"""SFT and DPO baselines: data from ranked samples, the tracker against the trainers' checkpoints, and
--precision: mixed (fp32 weights, TRL's bf16 autocast, judged at bf16), bf16 (with its warning), fp32."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from subnetscope import baselines
from subnetscope.baselines import (
    BaselineConfig,
    build_records,
    dpo_records,
    sft_records,
    train_baseline,
    trl_prompts,
)
from subnetscope.callback import MASTER_BASE_FILE, TRACKER_FILE, SubnetTrackerCallback
from subnetscope.changes import RULES
from subnetscope.cli.sft import main as sft_main
from subnetscope.data import chat_prompts, load_prompts
from subnetscope.errors import SubnetscopeError
from subnetscope.models import load_causal_lm, word_tokenizer
from subnetscope.precision import BF16_WARNING, resolve_precision

from .test_callback import check_view_run
from .test_grpo_run import offline_counts

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}<|assistant|>{% endif %}"


class Recording(SubnetTrackerCallback):
    """The callback, noting what the trainer ran with: TRL's bf16 flag, the weights' dtypes, and the
    dtype a forward pass computes in."""

    seen: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        Recording.seen = {"bf16": args.bf16, "weights": {p.dtype for p in model.parameters()}, "outputs": set()}
        model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: Recording.seen["outputs"].add(o.dtype))
        super().on_train_begin(args, state, control, model=model, **kwargs)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(baselines, "SubnetTrackerCallback", Recording)
    return Recording


def easy(tmp_path, task: str, **kw) -> dict:
    return {**dict(task=task, reward="easy", dataset="easy", device="cpu", max_new_tokens=8, lr=1e-3, save_every=2,
                   batch_size=4, max_prompts=8, output_dir=str(tmp_path / task)), **kw}


def test_records_keep_the_best_and_the_worst():
    samples = [[(0.9, "great"), (0.1, "fine"), (-0.5, "awful")], [(0.2, "same"), (0.2, "same")], []]
    prompts = ["a", "b", "c"]
    assert sft_records(prompts, samples) == {"prompt": ["a", "b"], "completion": [" great", " same"]}
    assert dpo_records(prompts, samples) == {"prompt": ["a"], "chosen": [" great"], "rejected": [" awful"]}
    with pytest.raises(SubnetscopeError, match="no prompt got samples of different reward"):
        dpo_records(["b"], [samples[1]])


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_fp32_tracker_counts_equal_the_trainers_checkpoints_and_resume(tmp_path, task, recording):
    cfg = easy(tmp_path, task, precision="fp32")
    train_baseline(BaselineConfig(max_steps=2, **cfg))
    callback = train_baseline(BaselineConfig(max_steps=4, resume=True, **cfg))
    run = Path(cfg["output_dir"])
    assert [r.step for r in callback.history] == [3, 4]  # resumed after checkpoint-2
    record = callback.history[-1]
    offline = offline_counts(run, run / "checkpoint-4")
    for i, name in enumerate(record.names):
        for rule in RULES:
            assert record.vs_initial[rule][i] == offline[name][rule]
        assert record.ever_changed[i] >= record.vs_initial["exact"][i]
    assert (run / "checkpoint-2" / "subnet_tracker.safetensors").exists() and (run / "final").is_dir()
    # fp32 as before: fp32 throughout, no autocast, no rounding, no master counts
    assert recording.seen == {"bf16": False, "weights": {torch.float32}, "outputs": {torch.float32}}
    assert {v.dtype for v in load_file(str(run / "base" / "model.safetensors")).values()} == {torch.float32}
    assert not (run / "checkpoint-4" / "subnet.safetensors").exists() and not (run / MASTER_BASE_FILE).exists()
    assert callback.master is None and not any("changed_master" in line for line in
                                               (run / "subnet_metrics.jsonl").read_text().splitlines())
    settings = json.loads((run / "run_config.json").read_text())["settings"]
    assert (settings["precision_used"], settings["view_dtype_used"]) == ("fp32", "float32")


def _untimed(jsonl: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in jsonl.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_mixed_judges_fp32_weights_at_bf16_and_resumes_bit_identically(tmp_path, task, recording):
    cfg = easy(tmp_path, task, precision="mixed")
    run = Path(cfg["output_dir"])
    callback = train_baseline(BaselineConfig(max_steps=4, **cfg))
    assert recording.seen["bf16"] and recording.seen["weights"] == {torch.float32}  # TRL's mixed precision
    assert torch.bfloat16 in recording.seen["outputs"]  # its autocast, on CPU
    theta0 = {n: p.detach().numpy() for n, p in
              load_causal_lm("tiny-gpt2", torch.float32, vocab_size=len(word_tokenizer())).named_parameters()}
    assert [r.step for r in callback.history] == [1, 2, 3, 4]
    check_view_run(run, callback, theta0, [2, 4])
    masters = load_numpy(str(run / MASTER_BASE_FILE))
    assert all(np.array_equal(masters[n], theta0[n]) for n in theta0)
    assert {v.dtype for v in load_file(str(run / "final" / "model.safetensors")).values()} == {torch.bfloat16}
    settings = json.loads((run / "run_config.json").read_text())["settings"]
    assert (settings["precision_used"], settings["view_dtype_used"]) == ("mixed", "bfloat16")

    # killed after checkpoint-2: the resumed run ends bit for bit where the uninterrupted one did
    full = {name: (run / "checkpoint-4" / name).read_bytes() for name in ("model.safetensors", TRACKER_FILE)}
    compact = load_file(str(run / "checkpoint-4" / "subnet.safetensors"))
    metrics = (run / "subnet_metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final")
    resumed = train_baseline(BaselineConfig(max_steps=4, resume=True, **cfg))
    assert [r.step for r in resumed.history] == [3, 4]
    assert {name: (run / "checkpoint-4" / name).read_bytes() for name in full} == full
    again = load_file(str(run / "checkpoint-4" / "subnet.safetensors"))  # its metadata's order varies: by value
    assert again.keys() == compact.keys() and all(torch.equal(again[k], compact[k]) for k in compact)
    assert _untimed((run / "subnet_metrics.jsonl").read_text()) == _untimed(metrics)  # time/ is wall-clock


def test_bf16_warns_and_updates_bf16_weights_directly(tmp_path, recording, capsys):
    cfg = easy(tmp_path, "sft", precision="bf16", save_every=1)
    callback = train_baseline(BaselineConfig(max_steps=1, **cfg))
    assert capsys.readouterr().err.count(BF16_WARNING) == 1
    assert recording.seen == {"bf16": False, "weights": {torch.bfloat16}, "outputs": {torch.bfloat16}}
    run = Path(cfg["output_dir"])
    assert {v.dtype for v in load_file(str(run / "checkpoint-1" / "model.safetensors")).values()} == {torch.bfloat16}
    assert callback.master is None and {v.dtype for v in load_file(str(run / "base" / "model.safetensors")).values()} \
        == {torch.bfloat16}
    record, offline = callback.history[-1], offline_counts(run, run / "checkpoint-1")
    assert all(record.vs_initial[r][i] == offline[n][r] for i, n in enumerate(record.names) for r in RULES)


def test_a_precision_change_on_resume_is_refused_before_any_work(tmp_path, capsys):
    cfg = easy(tmp_path, "sft", precision="fp32", save_every=1)
    train_baseline(BaselineConfig(max_steps=1, **cfg))
    run = Path(cfg["output_dir"])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        sft_main(["--task", "sft", "--reward", "easy", "--dataset", "easy", "--device", "cpu", "--max_new_tokens", "8",
                  "--lr", "0.001", "--save_every", "1", "--batch_size", "4", "--max_prompts", "8", "--max_steps", "2",
                  "--output_dir", str(run), "--resume", "--precision", "mixed"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:")
    assert "--precision mixed (run has fp32)" in err and "Traceback" not in err
    # `auto` resolved elsewhere (a GPU: mixed) is refused too, once it is resolved here
    config = json.loads((run / "run_config.json").read_text())
    config["settings"].update(precision="auto", precision_used="mixed", view_dtype_used="bfloat16")
    (run / "run_config.json").write_text(json.dumps(config))
    before[run / "run_config.json"] = (run / "run_config.json").read_bytes()
    with pytest.raises(SubnetscopeError, match=r"another precision: --precision_used fp32 \(run has mixed\)"):
        train_baseline(BaselineConfig(max_steps=2, resume=True, **{**cfg, "precision": "auto"}))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_prompts_in_the_chat_template_rewards_on_plain_text(tmp_path, monkeypatch):
    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    rewarded = []

    def reward(prompts, completions, ids):
        rewarded.extend(prompts)
        return [float(len(c)) for c in completions]

    monkeypatch.setattr(baselines, "build_reward", lambda *a: reward)
    model = load_causal_lm("tiny-gpt2", torch.float32, vocab_size=len(tok))
    precision = resolve_precision("fp32", "cpu")
    config = BaselineConfig(**easy(tmp_path, "sft", max_prompts=3, candidates=2))
    records = build_records(config, model, tok, precision, "cpu", templated=True)
    plain = load_prompts("easy", tok, config.max_prompt_tokens)[:3]  # as the word tokenizer writes them back
    assert records["prompt"] == chat_prompts(tok, plain) == [f"<|user|> {p}\n<|assistant|>" for p in plain]
    assert set(rewarded) == set(plain)
    assert not any("<|" in c for c in records["completion"])
    assert build_records(config, model, tok, precision, "cpu", templated=False)["prompt"] == plain


def test_trl_prompts_drop_a_template_bos_the_tokenizer_adds_itself():
    class Tok:
        bos_token, bos_token_id = "<bos>", 2

        def __init__(self, adds: bool):
            self.adds = adds

        def __call__(self, text):
            return {"input_ids": ([2] if self.adds else []) + [7]}

    templated = ["<bos><user> hi <model>"]
    assert trl_prompts(Tok(adds=True), templated) == ["<user> hi <model>"]
    assert trl_prompts(Tok(adds=False), templated) == templated


def test_bad_settings():
    with pytest.raises(SubnetscopeError, match="--task"):
        BaselineConfig(task="ppo").validate()
    with pytest.raises(SubnetscopeError, match="--candidates"):
        BaselineConfig(candidates=1).validate()
    with pytest.raises(SubnetscopeError, match="--precision 'fp16'"):
        BaselineConfig(precision="fp16").validate()
    with pytest.raises(SubnetscopeError, match="--view_dtype must be bfloat16"):
        BaselineConfig(precision="bf16", view_dtype="float32").validate()
