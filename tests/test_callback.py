"""SubnetTrackerCallback on its own: judged at a bf16 view inside TRL's GRPOTrainer (bf16 autocast on fp32
weights), θ0 (base/) handled safely on fresh starts and resumes, and every file written atomically.

The view counts are checked against an independent count: numpy rounds the trainer's fp32 checkpoint
to bf16 (round to nearest even on the bits) and applies the three rules of changes.py itself."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from transformers import DefaultFlowCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from subnetscope import callback as callback_module
from subnetscope.callback import MASTER_BASE_FILE, TRACKER_FILE, SubnetTrackerCallback
from subnetscope.changes import RULES, ChangeRules
from subnetscope.errors import SubnetscopeError
from subnetscope.models import tiny_model, word_tokenizer

from .test_grpo_run import offline_counts


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 (kept as float32) by integer round-to-nearest-even on the bits, no torch."""
    assert x.dtype == np.float32 and np.isfinite(x).all()
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def numpy_counts(a: np.ndarray, b: np.ndarray, rules: ChangeRules = ChangeRules()) -> dict[str, int]:
    """The three rules on finite float32 arrays: bits differ; and |Δ| > atol; and |Δ| > η·max(|a|,|b|)."""
    exact = a.view(np.uint32) != b.view(np.uint32)
    absd = np.abs(b - a)
    atol = exact & (absd > np.float32(rules.atol))
    relative = exact & (absd > np.float32(rules.eta) * np.maximum(np.abs(a), np.abs(b)))
    return {"exact": int(exact.sum()), "atol": int(atol.sum()), "relative": int(relative.sum())}


def float32_file(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as float32 numpy arrays (bf16 widened exactly by shifting its bits)."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    if all(v.get("dtype") != "BF16" for k, v in header.items() if k != "__metadata__"):
        return load_numpy(str(path))
    raw = {k: v.view(torch.int16).numpy() for k, v in load_file(str(path)).items()}
    return {k: (v.astype(np.uint16).astype(np.uint32) << 16).view(np.float32) for k, v in raw.items()}


def view_counts(run: Path, step: int) -> dict[str, dict[str, int]]:
    """Per tensor: base/ against the rounding of the trainer's fp32 checkpoint-N, counted in numpy."""
    base = float32_file(run / "base" / "model.safetensors")
    tuned = load_numpy(str(run / f"checkpoint-{step}" / "model.safetensors"))
    assert all(v.dtype == np.float32 for v in tuned.values())  # the trainer keeps the fp32 masters
    return {n: numpy_counts(base[n], bf16_rne(tuned[n])) for n in base}


def master_counts(theta0: dict[str, np.ndarray], run: Path, step: int) -> dict[str, int]:
    """The fp32 weights of checkpoint-N against the fp32 θ0, summed over tensors, in numpy."""
    tuned = load_numpy(str(run / f"checkpoint-{step}" / "model.safetensors"))
    totals = {r: 0 for r in RULES}
    for name, a in theta0.items():
        for rule, c in numpy_counts(a, tuned[name]).items():
            totals[rule] += c
    return totals


def check_view_run(run: Path, callback: SubnetTrackerCallback, theta0: dict[str, np.ndarray], steps: list[int]) -> None:
    """Every saved step: the callback's view counts equal numpy's and the offline analysis's (which reads
    the compact bf16 checkpoint), its changed_master fractions equal numpy's fp32 diff."""
    by_step = {r.step: r for r in callback.history}
    metrics = {m["step"]: m for m in map(json.loads, (run / "subnet_metrics.jsonl").read_text().splitlines())}
    total = sum(a.size for a in theta0.values())
    for step in steps:
        record = by_step[step]
        independent = view_counts(run, step)
        offline = offline_counts(run, run / f"checkpoint-{step}")
        for i, name in enumerate(record.names):
            for rule in RULES:
                assert record.vs_initial[rule][i] == independent[name][rule] == offline[name][rule], (step, name)
        for rule, count in master_counts(theta0, run, step).items():
            assert metrics[step][f"changed_master/{rule}"] == count / total
        # the rounding hides steps: fewer weights differ at bf16 than in the fp32 masters
        assert record.total("vs_initial", "exact") < master_counts(theta0, run, step)["exact"]
    assert {v.dtype for v in load_file(str(run / "base" / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((run / "base" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_trl_grpo_trainer_bf16_autocast_judged_at_bf16(tmp_path):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    tok = word_tokenizer()
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    theta0 = load_numpy(str(tmp_path / "tiny" / "model.safetensors"))
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=3, save_steps=1, save_strategy="steps", report_to="none",
                      use_cpu=True, logging_steps=1, learning_rate=1e-3, bf16=True)
    ds = datasets.Dataset.from_dict({"prompt": [f"Sample {i:02d}:" for i in range(16)]})
    callback = SubnetTrackerCallback(view_dtype=torch.bfloat16)
    trainer = GRPOTrainer(model=str(tmp_path / "tiny"), args=args, train_dataset=ds, processing_class=tok,
                          reward_funcs=lambda completions, completion_ids, **kw: [
                              sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids],
                          callbacks=[callback])
    autocast = []
    trainer.model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: autocast.append(o.dtype))
    trainer.train()
    run = tmp_path / "trl"
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert torch.bfloat16 in autocast  # TRL's bf16=True: forward passes under bf16 autocast
    assert [r.step for r in callback.history] == [1, 2, 3]
    check_view_run(run, callback, theta0, [1, 2, 3])
    masters = load_numpy(str(run / MASTER_BASE_FILE))
    assert all(np.array_equal(masters[n], theta0[n]) for n in masters)


def fake_run(out: Path, step: int = 0, max_steps: int = 2):
    args = SimpleNamespace(output_dir=str(out))
    state = SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)
    return args, state


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_fresh_start_rewrites_a_stale_base(tmp_path):
    """A killed start left base/ of another model and no checkpoint: the new start's θ0 replaces it."""
    tok = word_tokenizer()
    out = tmp_path / "run"
    tiny_model("gpt2", seed=1, vocab_size=len(tok), n_embd=16).save_pretrained(out / "base")
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    SubnetTrackerCallback().on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    base = saved_tensors(out / "base")
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters())
    assert not (out / MASTER_BASE_FILE).exists()


def test_fresh_start_beside_another_models_checkpoints_is_refused(tmp_path):
    tok = word_tokenizer()
    out = tmp_path / "run"
    tiny_model("gpt2", seed=1, vocab_size=len(tok), n_embd=16).save_pretrained(out / "base")
    (out / "checkpoint-2").mkdir()
    before = (out / "base" / "model.safetensors").read_bytes()
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    with pytest.raises(SubnetscopeError, match=r"holds checkpoint-2 of another model .*base: its transformer\.") as err:
        SubnetTrackerCallback().on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    assert "\n" not in str(err.value)
    assert (out / "base" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("case", ["no_base", "other_model", "other_view", "no_master"])
def test_resume_refuses_a_theta0_it_cannot_trust(tmp_path, case):
    tok = word_tokenizer()
    out = tmp_path / "run"
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    if case == "other_model":
        tiny_model("gpt2", seed=0, vocab_size=len(tok), n_embd=16).save_pretrained(out / "base")
    elif case in ("other_view", "no_master"):
        SubnetTrackerCallback(view_dtype=torch.bfloat16).on_train_begin(*fake_run(out), None, model=model)
        if case == "no_master":
            (out / MASTER_BASE_FILE).unlink()
    view = torch.bfloat16 if case == "no_master" else None  # other_view: θ0 saved at bf16, now judged in fp32
    expected = {"no_base": "base .*is missing", "other_model": "another model's θ0",
                "other_view": "holds θ0 in bfloat16 but this run judges in float32",
                "no_master": f"{MASTER_BASE_FILE} .*is missing"}[case]
    with pytest.raises(SubnetscopeError, match=expected) as err:
        SubnetTrackerCallback(view_dtype=view).on_train_begin(*fake_run(out, step=2), None, model=model)
    assert "\n" not in str(err.value)


def test_base_and_tracker_state_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails halfway leaves the previous base/ and tracker file whole, and no temporary names."""
    tok = word_tokenizer()
    out = tmp_path / "run"
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    callback = SubnetTrackerCallback()
    callback.on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    (out / "checkpoint-1").mkdir()
    callback.on_save(*fake_run(out, step=1), None)
    before = {p: p.read_bytes() for p in (out / "base" / "model.safetensors", out / "checkpoint-1" / TRACKER_FILE)}

    def half_written(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError("disk went away")

    monkeypatch.setattr(callback_module, "save_model", lambda model, folder, dtype: half_written(folder / "x"))
    monkeypatch.setattr(callback_module, "save_file", lambda tensors, path, **kw: half_written(Path(path)))
    with pytest.raises(OSError, match="disk went away"):
        callback.on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    with pytest.raises(OSError, match="disk went away"):
        callback.on_save(*fake_run(out, step=1), None)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["base", "checkpoint-1"]
    assert not [p.name for p in (out / "checkpoint-1").iterdir() if p.name != TRACKER_FILE]


def test_view_of_the_weights_own_dtype_changes_nothing(tmp_path):
    """view_dtype equal to the weights' dtype (or None): no rounding, no master tracker, no compact file."""
    tok = word_tokenizer()
    for view in (None, torch.float32):
        out = tmp_path / str(view)
        model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
        callback = SubnetTrackerCallback(view_dtype=view)
        callback.on_train_begin(*fake_run(out), None, model=model)
        with torch.no_grad():
            model.transformer.wte.weight[0, :3] += 1.0
        callback.on_optimizer_step(*fake_run(out, step=0), None)
        (out / "checkpoint-1").mkdir()
        callback.on_save(*fake_run(out, step=1), None)
        assert callback.master is None and callback.history[-1].total("vs_initial", "exact") == 3
        assert sorted(p.name for p in (out / "checkpoint-1").iterdir()) == [TRACKER_FILE]
        assert not any(k.startswith("changed_master/") for k in json.loads(
            (out / "subnet_metrics.jsonl").read_text().splitlines()[-1]))


class Recorder(TrainerCallback):
    """Stands for a report_to integration (W&B, TensorBoard): what its on_log receives."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_subnet_metrics_reach_the_integrations_and_log_history(tmp_path):
    """transformers puts the user's callbacks after the integrations and appends the log to log_history
    before calling them: the callback moves itself first, and writes into the appended entry too."""
    tok = word_tokenizer()
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    callback, recorder = SubnetTrackerCallback(), Recorder()
    handler = CallbackHandler([DefaultFlowCallback, recorder, callback], model, tok, None, None)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    state, control = TrainerState(max_steps=2, is_world_process_zero=True), TrainerControl()
    handler.on_train_begin(args, state, control)
    assert handler.callbacks[0] is callback
    for step in (1, 2):
        with torch.no_grad():
            model.transformer.wte.weight[step, :step] += 1.0
        handler.on_optimizer_step(args, state, control)
        state.global_step = step
        logs = {"loss": 0.5}
        state.log_history.append({**logs, "step": step})  # as Trainer.log does
        handler.on_log(args, state, control, logs)
        changed = step * (step + 1) // 2  # 1 weight at step 1, 2 more at step 2
        assert recorder.seen[-1]["subnet/changed/exact"] == changed / sum(callback.history[-1].numel)
        assert state.log_history[-1]["subnet/changed/exact"] == recorder.seen[-1]["subnet/changed/exact"]
    handler.on_log(args, state, control, {"train_runtime": 1.0})  # the summary: no second copy of step 2
    assert "subnet/changed/exact" not in recorder.seen[-1]


@pytest.mark.slow
def test_wandb_offline_run_has_the_subnet_series(tmp_path, monkeypatch):
    """TRL's SFTTrainer with report_to="wandb" (offline): the run's history holds subnet/changed/* at every
    logged step, with the callback's values, and trainer.state.log_history holds them too."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tok = word_tokenizer()
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    data = datasets.Dataset.from_dict({"prompt": [f"Sample {i:02d}:" for i in range(8)],
                                       "completion": [" a good one"] * 8})
    callback = SubnetTrackerCallback()
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, logging_steps=1, per_device_train_batch_size=4,
                     learning_rate=1e-3, report_to="wandb", use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model=str(tmp_path / "tiny"), args=args, train_dataset=data, processing_class=tok,
                         callbacks=[callback])
    trainer.train()
    import wandb

    wandb.finish()
    expected = {r.step: r.total("vs_initial", "exact") / sum(r.numel) for r in callback.history}
    logged = {e["step"]: e["subnet/changed/exact"] for e in trainer.state.log_history if "subnet/changed/exact" in e}
    assert logged == expected and len(expected) == 3
    from subnetscope.wandb_runs import offline_runs

    deadline = time.monotonic() + 60  # wandb's service process may still be writing the file under load
    while True:
        (run,) = offline_runs(tmp_path / "wandb")
        rows = [r for r in run["records"] if "train/subnet/changed/exact" in r]
        if len(rows) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {r["train/global_step"]: r["train/subnet/changed/exact"] for r in rows} == pytest.approx(expected)


def trained_run(tmp_path, seed: int = 0, steps: int = 1, **kw) -> tuple[Path, SubnetTrackerCallback, torch.nn.Module]:
    """A TRL-layout run folder made by the callback's hooks: base/, checkpoint-N/ with the tracker's state."""
    tok = word_tokenizer()
    out = tmp_path / "run"
    model = tiny_model("gpt2", seed=seed, vocab_size=len(tok))
    callback = SubnetTrackerCallback(**kw)
    callback.on_train_begin(*fake_run(out, max_steps=steps), None, model=model, processing_class=tok)
    for step in range(steps):
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight[step, :5] += 1.0
        callback.on_optimizer_step(*fake_run(out, step=step), None)
        (out / f"checkpoint-{step + 1}").mkdir()
        model.save_pretrained(out / f"checkpoint-{step + 1}")
        callback.on_save(*fake_run(out, step=step + 1), None)
    return out, callback, model


def test_fresh_start_beside_checkpoints_of_a_same_shaped_model_is_refused(tmp_path):
    """Same names and shapes, other values (another seed): the fingerprint tells them apart (before: base/
    silently rewritten beside the other run's checkpoints)."""
    out, _, _ = trained_run(tmp_path, seed=1)
    before = (out / "base" / "model.safetensors").read_bytes()
    model = tiny_model("gpt2", seed=0, vocab_size=len(word_tokenizer()))
    with pytest.raises(SubnetscopeError, match=r"holds checkpoint-1 of another model .*holds other values") as err:
        SubnetTrackerCallback().on_train_begin(*fake_run(out), None, model=model)
    assert "\n" not in str(err.value)
    assert (out / "base" / "model.safetensors").read_bytes() == before


def test_a_stale_base_kept_by_save_base_false_is_refused(tmp_path):
    tok = word_tokenizer()
    out = tmp_path / "run"
    tiny_model("gpt2", seed=1, vocab_size=len(tok)).save_pretrained(out / "base")
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    with pytest.raises(SubnetscopeError, match=r"is not this model's θ0 .*save_base=False") as err:
        SubnetTrackerCallback(save_base=False).on_train_begin(*fake_run(out), None, model=model)
    assert "\n" not in str(err.value)
    model.save_pretrained(out / "base")  # the right θ0: accepted
    SubnetTrackerCallback(save_base=False).on_train_begin(*fake_run(out), None, model=model)


def test_resume_against_a_replaced_base_is_refused(tmp_path):
    """The tracker file records θ0's fingerprint: a base/ swapped for another model of the same shapes since
    the checkpoint was saved is refused on resume (before: 99% "changed")."""
    out, _, model = trained_run(tmp_path)
    tiny_model("gpt2", seed=1, vocab_size=len(word_tokenizer())).save_pretrained(out / "base")
    with pytest.raises(SubnetscopeError, match=r"was tracked against another θ0 .*holds other values") as err:
        SubnetTrackerCallback().on_train_begin(*fake_run(out, step=1), None, model=model)
    assert "\n" not in str(err.value)


def test_offload_counts_the_same_on_cpu_copies(tmp_path):
    """offload=True: the tracker works on its own CPU copies (none of its buffers is a model parameter), with
    the same counts as the default."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, plain, _ = trained_run(tmp_path / "a", steps=2)
    _, offloaded, model = trained_run(tmp_path / "b", steps=2, offload=True)
    assert [r.vs_initial for r in offloaded.history] == [r.vs_initial for r in plain.history]
    assert offloaded.history[-1].total("vs_initial", "exact") == 10
    model_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not model_storage & {t.untyped_storage().data_ptr() for t in offloaded.tracker.params.values()}
    assert set(offloaded.overhead) == {"cpu"}
    assert sum(offloaded.overhead.values()) > sum(plain.overhead.values())  # + the mirror


def test_reference_model_shares_theta0(tmp_path):
    """reference=: the frozen reference's parameters become views of the tracker's θ0 (one copy, not two), the
    overhead drops by θ0's bytes, the counts stay; a reference that is not θ0 is refused."""
    tok = word_tokenizer()
    (tmp_path / "a").mkdir()
    _, plain, _ = trained_run(tmp_path / "a")
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    reference = tiny_model("gpt2", seed=0, vocab_size=len(tok)).requires_grad_(False)
    callback = SubnetTrackerCallback(reference=reference)
    callback.on_train_begin(*fake_run(tmp_path / "run"), None, model=model, processing_class=tok)
    initial = callback.tracker.groups[0].initial.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == initial for p in reference.parameters())
    theta0 = callback.tracker.groups[0].initial.numel() * 4
    assert sum(callback.overhead.values()) == sum(plain.overhead.values()) - theta0
    other = tiny_model("gpt2", seed=1, vocab_size=len(tok))
    with pytest.raises(SubnetscopeError, match="the reference model is not θ0"):
        SubnetTrackerCallback(reference=other).on_train_begin(*fake_run(tmp_path / "run2"), None, model=model)


def test_sharded_parameters_are_refused(tmp_path):
    """DeepSpeed ZeRO-3's partitions (marked with ds_id) do not say which entries a process holds: refused in
    one line (FSDP2's DTensor shards are counted: test_callback_fsdp.py)."""
    model = tiny_model("gpt2", seed=0, vocab_size=len(word_tokenizer()))
    model.transformer.wte.weight.ds_id = 0
    with pytest.raises(SubnetscopeError, match=r"sharded \(transformer\.wte\.weight: FSDP or DeepSpeed ZeRO-3\)"):
        SubnetTrackerCallback().on_train_begin(*fake_run(tmp_path / "run"), None, model=model)
    assert not (tmp_path / "run").exists()


def test_compute_masks_reads_a_trl_run_folder(tmp_path):
    """checkpoint-N/subnet_tracker.safetensors is read like step_N/tracker.safetensors (before: "no step
    checkpoint with tracker state"); the mask is the tracker's ever-changed set, fingerprinted by base/."""
    from subnetscope.cli import compute_masks
    from subnetscope.masks import fingerprint_of, load_masks

    out, callback, model = trained_run(tmp_path, steps=2)
    assert compute_masks.main(["--from_run", str(out), "--output_dir", str(tmp_path / "masks"), "--no-plot"]) == 0
    mask_set = load_masks(tmp_path / "masks" / "mask_ever_changed_step2.safetensors")
    assert sum(int(m.sum()) for m in mask_set.masks.values()) == 10
    assert torch.equal(mask_set.masks["transformer.h.0.mlp.c_fc.weight"][:2, :5], torch.ones(2, 5, dtype=torch.bool))
    assert mask_set.fingerprint == fingerprint_of(model)
