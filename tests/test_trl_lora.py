"""LoRA (PEFT) runs tracked as the merged model W0 + scale·B·A, against PEFT's own merge_and_unload.

The fast tests drive SubnetTrackerCallback's hooks on a PEFT model whose A and B are moved by hand (a
stand-in for optimizer steps); the independent count merges a deep copy with PEFT's merge_and_unload and
compares its weights with the original ones bit for bit (and under the atol / relative rules in numpy).
The slow test trains and resumes TRL's GRPOTrainer with a peft_config (before: KeyError on resume)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from subnetscope.callback import TRACKER_FILE, SubnetTrackerCallback
from subnetscope.changes import RULES, ChangeRules
from subnetscope.checkpoint import open_checkpoint, read_ever_changed
from subnetscope.cli import analyze, compute_masks
from subnetscope.engine import analyze_pair
from subnetscope.errors import SubnetscopeError
from subnetscope.export import export_step
from subnetscope.masks import load_masks, model_fingerprint
from subnetscope.models import tiny_model, word_tokenizer

from .test_callback import bf16_rne, fake_run, numpy_counts

TARGETS = ["c_attn", "c_fc"]


def lora_model(seed: int = 0, **config):
    tok = word_tokenizer()
    base = tiny_model("gpt2", seed=seed, vocab_size=len(tok))
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, fan_in_fan_out=True, **config))
    return model, theta0, tok


def lora_step(model, seed: int, scale: float = 0.05) -> None:
    """Move A and B as an optimizer would; B's first row stays 0, so its output row of ΔW stays 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                step = torch.randn(p.shape, generator=gen) * scale
                if "lora_B" in name:
                    step[0] = 0
                p.add_(step)


def merged_counts(model, theta0: dict[str, torch.Tensor], view: bool = False) -> dict[str, dict[str, int]]:
    """Per base weight: PEFT's merge_and_unload of a copy against θ0, counted in numpy (bf16 rounding by bits)."""
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    out = {}
    for name, w0 in theta0.items():
        a, b = w0.numpy(), merged[name].detach().numpy()
        if view:
            a, b = bf16_rne(a), bf16_rne(b)
        out[name] = numpy_counts(a, b)
    return out


def tracked(callback: SubnetTrackerCallback) -> dict[str, dict[str, int]]:
    record = callback.history[-1]
    return {n: {r: record.vs_initial[r][i] for r in RULES} for i, n in enumerate(record.names)}


@pytest.mark.parametrize("view", [None, torch.bfloat16])
def test_lora_tracked_as_merged_weights_under_base_names(tmp_path, view):
    model, theta0, tok = lora_model()
    callback = SubnetTrackerCallback(view_dtype=view)
    out = tmp_path / "run"
    callback.on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    for step in range(2):
        lora_step(model, seed=step)
        callback.on_optimizer_step(*fake_run(out, step=step), None)
        independent = merged_counts(model, theta0, view=view is not None)
        assert tracked(callback) == independent
    counts = tracked(callback)
    assert set(counts) == set(theta0)  # the base model's names: no lora_A, base_layer or .default
    adapted = [n for n in counts if any(t in n for t in TARGETS) and n.endswith("weight")]
    assert all(0 < counts[n]["exact"] < theta0[n].numel() for n in adapted)  # B's zero row keeps a row unchanged
    assert all(c["exact"] == 0 for n, c in counts.items() if n not in adapted)
    if view is not None:  # the rounding hides small merged updates that the fp32 merge shows
        assert sum(c["exact"] for c in counts.values()) < sum(
            c["exact"] for c in merged_counts(model, theta0).values())
    base = load_file(str(out / "base" / "model.safetensors"))
    assert all(torch.equal(base[n], theta0[n]) for n in base if n in theta0)  # base/ is W0, not the adapter
    assert not any("lora" in k or "base_layer" in k for k in base)


def test_lora_tracker_keeps_no_merged_matrix(tmp_path):
    """Its state is the step each entry first changed (int16) and copies of A and B: far below the model."""
    model, theta0, tok = lora_model()
    callback = SubnetTrackerCallback()
    callback.on_train_begin(*fake_run(tmp_path / "run"), None, model=model, processing_class=tok)
    adapted = sum(theta0[n].numel() for n in callback.tracker.adapted)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(callback.overhead.values()) == adapted * 2 + lora * 4


def save_adapter(model, folder: Path, step: int, callback: SubnetTrackerCallback, out: Path) -> Path:
    """A TRL checkpoint-N of a LoRA run: the adapter (PEFT's save_pretrained), then the callback's state."""
    model.save_pretrained(folder)
    callback.on_save(*fake_run(out, step=step), None)
    return folder


def test_lora_resume_continues_the_count(tmp_path):
    """Saved, restored into a fresh callback, and stepped again: the same record as an uninterrupted run."""
    model, theta0, tok = lora_model()
    out = tmp_path / "run"
    callback = SubnetTrackerCallback()
    callback.on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    lora_step(model, seed=0)
    callback.on_optimizer_step(*fake_run(out, step=0), None)
    save_adapter(model, out / "checkpoint-1", 1, callback, out)
    keys = set(load_file(str(out / "checkpoint-1" / TRACKER_FILE)))
    assert keys == {f"first_changed::{n}" for n in callback.tracker.adapted}
    resumed = SubnetTrackerCallback()
    resumed.on_train_begin(*fake_run(out, step=1), None, model=model, processing_class=tok)
    lora_step(model, seed=1)
    callback.on_optimizer_step(*fake_run(out, step=1), None)
    resumed.on_optimizer_step(*fake_run(out, step=1), None)
    a, b = callback.history[-1], resumed.history[-1]
    assert (a.vs_initial, a.vs_previous, a.ever_changed) == (b.vs_initial, b.vs_previous, b.ever_changed)
    assert sum(b.vs_previous["exact"]) > 0


def test_lora_resume_against_another_base_is_refused(tmp_path):
    model, _, tok = lora_model()
    out = tmp_path / "run"
    SubnetTrackerCallback().on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    other, _, _ = lora_model(seed=1)  # same shapes, other weights
    with pytest.raises(SubnetscopeError, match="is not the base model this LoRA run adapts .*other values") as err:
        SubnetTrackerCallback().on_train_begin(*fake_run(out, step=1), None, model=other, processing_class=tok)
    assert "\n" not in str(err.value)


def test_dora_is_refused(tmp_path):
    model, _, tok = lora_model(use_dora=True)
    with pytest.raises(SubnetscopeError, match="DoRA"):
        SubnetTrackerCallback().on_train_begin(*fake_run(tmp_path / "run"), None, model=model, processing_class=tok)


def lora_run(tmp_path, steps: int = 2) -> tuple[Path, SubnetTrackerCallback, object, dict]:
    model, theta0, tok = lora_model()
    out = tmp_path / "run"
    callback = SubnetTrackerCallback()
    callback.on_train_begin(*fake_run(out), None, model=model, processing_class=tok)
    for step in range(steps):
        lora_step(model, seed=step)
        callback.on_optimizer_step(*fake_run(out, step=step), None)
        save_adapter(model, out / f"checkpoint-{step + 1}", step + 1, callback, out)
    return out, callback, model, theta0


def test_adapter_folders_are_read_merged(tmp_path):
    """The analysis reads checkpoint-N (the adapter) merged onto base/: the tracker's counts, tensor by tensor;
    and --tuned ADAPTER --base MODEL does the same from the command line."""
    out, callback, model, theta0 = lora_run(tmp_path)
    pair = analyze_pair(open_checkpoint(str(out / "base")), open_checkpoint(str(out / "checkpoint-2")), ChangeRules(),
                        progress=False)
    assert {t.name: t.changed for t in pair.tensors} == {n: c for n, c in tracked(callback).items()}
    code = analyze.main(["--base", str(out / "base"), "--tuned", str(out / "checkpoint-2"), "--output_dir",
                         str(tmp_path / "pair"), "--device", "cpu", "--no_tqdm"])
    summary = json.loads((tmp_path / "pair" / "summary.json").read_text())
    total = sum(c["exact"] for c in tracked(callback).values())
    assert code == 0 and summary["pair"]["changed"]["exact"] == total


def test_compute_masks_from_a_lora_run(tmp_path, capsys):
    out, callback, model, theta0 = lora_run(tmp_path)
    assert compute_masks.main(["--from_run", str(out), "--output_dir", str(tmp_path / "masks"), "--no-plot"]) == 0
    mask_set = load_masks(tmp_path / "masks" / "mask_ever_changed_step2.safetensors")
    assert set(mask_set.masks) == set(callback.tracker.adapted)
    assert all(torch.equal(mask_set.masks[n], callback.tracker.first_changed[n] >= 0) for n in mask_set.masks)
    base = open_checkpoint(str(out / "base"))
    assert mask_set.fingerprint == model_fingerprint({n: list(base.shape(n)) for n in base.names()})


def test_export_of_an_adapter_checkpoint_is_the_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    out, _, model, _ = lora_run(tmp_path)
    folder = export_step(out / "checkpoint-2", tmp_path / "export")
    exported = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert set(exported) == set(merged)
    assert all(torch.equal(exported[n], merged[n]) for n in merged)


@pytest.mark.slow
def test_trl_grpo_with_peft_config_resumes_and_counts_the_merge(tmp_path):
    """TRL's GRPOTrainer with peft_config, trained 2 steps, then resumed to 3 (before: KeyError on the adapter's
    keys); every checkpoint's counts equal PEFT's merge_and_unload of that checkpoint against the base."""
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = word_tokenizer()
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    data = datasets.Dataset.from_dict({"prompt": [f"Sample {i:02d}:" for i in range(16)]})

    def train(steps: int, resume: bool) -> SubnetTrackerCallback:
        args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, max_steps=steps, save_steps=1, report_to="none", use_cpu=True,
                          logging_steps=1, learning_rate=1e-2)
        callback = SubnetTrackerCallback()
        trainer = GRPOTrainer(model=str(tmp_path / "tiny"), args=args, train_dataset=data, processing_class=tok,
                              reward_funcs=lambda completion_ids, **kw: [sum(t % 2 == 0 for t in ids) / len(ids)
                                                                         for ids in completion_ids],
                              peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume or None)
        return callback

    first = train(2, False)
    resumed = train(3, True)
    assert [r.step for r in first.history] == [1, 2] and [r.step for r in resumed.history] == [3]
    theta0 = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").named_parameters()}
    for callback, step in ((first, 2), (resumed, 3)):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
        merged = dict(PeftModel.from_pretrained(base, tmp_path / "trl" / f"checkpoint-{step}")
                      .merge_and_unload().named_parameters())
        record = callback.history[-1]
        for i, name in enumerate(record.names):
            expected = int((theta0[name].numpy().view(np.int32) != merged[name].detach().numpy().view(np.int32)).sum())
            assert record.vs_initial["exact"][i] == expected, (step, name)
    step, masks = read_ever_changed(tmp_path / "trl")
    assert step == 3 and set(masks) == set(resumed.tracker.adapted)
