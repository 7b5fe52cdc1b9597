"""Sparse LoRA on PEFT, confined updates, check_mask.py, main_sparse_ft.py (with resume) and
prune_report.py's aggregation, each against an independent computation."""
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetscope.confine import ConfinedUpdates
from subnetscope.importance import prunable_tensors
from subnetscope.masks import MaskSet, fingerprint_of, save_masks
from subnetscope.models import tiny_model
from subnetscope.sparse_lora import add_sparse_lora, merge_sparse_lora

from .conftest import IMDB_JSONL, SIDE_BY_SIDE, TINY_GPT2_DIR, at_once, kill_when_exists, requires_shared

ROOT = Path(__file__).resolve().parents[1]


def random_masks(model, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.param.shape, generator=gen) < density for n, t in prunable_tensors(model).items()}


def with_trained_adapters(peft_model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model


def test_all_ones_mask_merges_exactly_like_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("gpt2", vocab_size=64).eval()
    ones = {n: torch.ones(t.param.shape, dtype=torch.bool) for n, t in prunable_tensors(model).items()}
    ours = with_trained_adapters(add_sparse_lora(copy.deepcopy(model), ones, "sparse_to_sparse", rank=4))
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules=sorted(
        n.rsplit(".", 1)[0] for n in ones), fan_in_fan_out=True))
    theirs.load_state_dict(ours.state_dict())
    a = dict(merge_sparse_lora(ours, ones).named_parameters())
    b = dict(theirs.merge_and_unload().named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_merged_weights_are_w_plus_ba_masked(mode):
    model = tiny_model("gpt2", vocab_size=64).eval()
    masks = random_masks(model, 0.4)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = with_trained_adapters(add_sparse_lora(copy.deepcopy(model), masks, mode, rank=4))
    layers = {n: peft_model.base_model.model.get_submodule(n.rsplit(".", 1)[0]) for n in masks}
    deltas = {}
    for n, layer in layers.items():  # B @ A by hand, in Conv1D's [in, out] layout
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        deltas[n] = (b @ a).T * layer.scaling["default"]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward = peft_model(input_ids=ids).logits
    merged = merge_sparse_lora(peft_model, masks)
    params = dict(merged.named_parameters())
    for n, m in masks.items():
        expect = ((original[n] + deltas[n]) * m).detach()
        assert torch.allclose(params[n], expect, atol=1e-6) and (params[n][~m] == 0).all()
    with torch.no_grad():
        same = torch.allclose(merged(input_ids=ids).logits, forward, atol=1e-5)
    # sparse_to_sparse trains exactly the model it merges into; sparse_to_dense does not
    assert same == (mode == "sparse_to_sparse")


def test_sparse_to_sparse_adapters_get_gradients():
    model = tiny_model("gpt2", vocab_size=64)
    peft_model = with_trained_adapters(add_sparse_lora(model, random_masks(model, 0.5), "sparse_to_sparse", rank=4))
    ids = torch.randint(0, 64, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora" not in n)


def test_confined_updates_hold_weights_outside_the_mask_bit_for_bit():
    def train(confine: bool):
        model = tiny_model("gpt2", vocab_size=64)
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        masks = random_masks(model, 0.3)
        confined = ConfinedUpdates(dict(model.named_parameters()), masks, anchors=theta0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(3):
            ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            if confine:
                confined.mask_gradients_()
            opt.step()
            opt.zero_grad()
            if confine:
                confined.project_()
        params = dict(model.named_parameters())
        return [(params[n][~m], theta0[n][~m], params[n][m], theta0[n][m]) for n, m in masks.items()]

    for outside, before, inside, inside_before in train(confine=True):
        assert torch.equal(outside, before) and not torch.equal(inside, inside_before)
    # without the projection weight decay alone moves the entries outside the mask
    assert any(not torch.equal(outside, before) for outside, before, _, _ in train(confine=False))


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)


ONE_THREAD = {**os.environ, **SIDE_BY_SIDE}


@pytest.fixture(scope="module")
def gpt2_mask(tmp_path_factory):
    out = tmp_path_factory.mktemp("masks")
    result = run("compute_masks.py", "--policy", str(TINY_GPT2_DIR), "--output_dir", str(out), "--sparsity", "0.5",
                 "--no-plot")
    assert result.returncode == 0, result.stderr
    return out / "mask_unstructured_magnitude_matrix_s0.50.safetensors"


def ft_args(out: Path, *extra: str) -> list[str]:
    return ["--policy", str(TINY_GPT2_DIR), "--task", str(IMDB_JSONL), "--max_texts", "200", "--seq_len", "32",
            "--batch_size", "4", "--max_steps", "8", "--save_every", "4", "--log_every", "2", "--eval_every", "4",
            "--eval_batches", "2", "--output_dir", str(out), "--no_tqdm", *extra]


METHOD_FLAGS = {"masked": ["--method", "masked"],
                "lora": ["--method", "lora", "--lora_mode", "sparse_to_sparse", "--lora_rank", "2"]}


@pytest.fixture(scope="module")
def runs_by_method(gpt2_mask, tmp_path_factory) -> dict[str, Path]:
    """A masked and a sparse LoRA run with weight decay, side by side, by method."""
    out = tmp_path_factory.mktemp("by_method")
    flags = ["--mask", str(gpt2_mask), "--weight_decay", "0.1"]
    results = at_once(*(lambda m=m: run("main_sparse_ft.py", *ft_args(out / m, *flags, *METHOD_FLAGS[m]),
                                        env=ONE_THREAD) for m in METHOD_FLAGS))
    for result in results:
        assert result.returncode == 0, result.stderr
    return {m: out / m for m in METHOD_FLAGS}


@requires_shared(IMDB_JSONL)
@pytest.mark.parametrize("method", ["masked", "lora"])
@pytest.mark.slow
def test_sparse_finetuning_runs_stay_sparse_and_validate(tmp_path, gpt2_mask, runs_by_method, method):
    run_dir = runs_by_method[method]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sparsity"] == 0.5 and config["mask_method"] == "unstructured/magnitude/matrix"
    check = run("check_mask.py", "--checkpoint", str(run_dir / "final"), "--mask_path", str(gpt2_mask),
                "--output", str(tmp_path / "report.json"))
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["overall"]["violations"] == 0 and report["overall"]["mask_sparsity"] == 0.5
    assert set(report["layers"]) == {"layer_0", "layer_1"}
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    base = load_file(str(TINY_GPT2_DIR / "model.safetensors"))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(final[name], base[name]), "training changed nothing"


@requires_shared(IMDB_JSONL)
def test_check_mask_fails_on_a_dense_checkpoint(tmp_path, gpt2_mask):
    result = run("check_mask.py", "--checkpoint", str(TINY_GPT2_DIR), "--mask_path", str(gpt2_mask),
                 "--output", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    masked_out = report["overall"]["masked_out"]
    assert result.returncode == 1 and report["overall"]["violations"] == masked_out > 0 and "FAIL" in result.stdout


@requires_shared(IMDB_JSONL)
@pytest.mark.slow
def test_sparse_finetuning_resumes_bit_identically(tmp_path, gpt2_mask):
    args = ["--mask", str(gpt2_mask), "--method", "lora", "--lora_dropout", "0.1"]
    killed = tmp_path / "killed"

    def killed_then_resumed():
        kill_when_exists([str(ROOT / "main_sparse_ft.py"), *ft_args(killed, *args)], ROOT, killed / "checkpoint-4",
                         env=ONE_THREAD)
        assert not (killed / "final").exists(), "the run finished before it could be killed"
        return run("main_sparse_ft.py", *ft_args(killed, *args, "--resume"), env=ONE_THREAD)

    full, resumed = at_once(lambda: run("main_sparse_ft.py", *ft_args(tmp_path / "full", *args), env=ONE_THREAD),
                            killed_then_resumed)
    assert full.returncode == 0, full.stderr
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "checkpoint-8" / "trainable.safetensors"))
    b = load_file(str(killed / "checkpoint-8" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sparse_finetuning_refuses_a_mask_of_another_model(tmp_path):
    other = tiny_model("gpt2", vocab_size=64, n_embd=16)
    path = save_masks(tmp_path / "m.safetensors",
                      MaskSet(random_masks(other, 0.5), {"model": "x"}, fingerprint_of(other)))
    result = run("main_sparse_ft.py", *ft_args(tmp_path / "run", "--mask", str(path)))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "does not match the model" in lines[0], result.stderr


def fake_run(folder: Path, model: str, method: str, sparsity: float, seed: int, loss: float, rate: float) -> None:
    folder.mkdir(parents=True)
    config = {"kind": "sparse_ft", "model_name": model, "task_name": "imdb", "finetune": method, "mask_method": "m",
              "sparsity": sparsity, "seed": seed}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 5, "train/loss": loss + 1, "throughput/samples_per_s": rate - 1},
        {"step": 10, "train/loss": loss + 0.5, "throughput/samples_per_s": rate + 1, "val/loss": loss}]))
    (folder / "summary.json").write_text(json.dumps({"val_loss": loss, "final_sparsity": sparsity, "steps": 10}))


@pytest.mark.slow
def test_prune_report_groups_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    losses = {(0.0, 0): 2.0, (0.0, 1): 2.2, (0.5, 0): 2.5, (0.5, 1): 2.9}
    for (sparsity, seed), loss in losses.items():
        fake_run(runs / f"s{sparsity}_{seed}", "gpt2", "masked", sparsity, seed, loss, 100 + 10 * seed)
    result = run("prune_report.py", "--results_dir", str(runs), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "grouped_summary.csv") as fh:
        groups = {float(r["target_sparsity"]): r for r in csv.DictReader(fh)}
    for sparsity in (0.0, 0.5):
        values = [losses[(sparsity, s)] for s in (0, 1)]
        assert float(groups[sparsity]["final_val_loss_mean"]) == pytest.approx(statistics.mean(values))
        assert float(groups[sparsity]["final_val_loss_std"]) == pytest.approx(statistics.stdev(values))
        assert float(groups[sparsity]["samples_per_s_mean"]) == pytest.approx(105.0)
    with open(tmp_path / "out" / "sparsity_vs_performance.csv") as fh:
        perf = {float(r["target_sparsity"]): r for r in csv.DictReader(fh)}
    assert float(perf[0.5]["val_loss_change"]) == pytest.approx(2.7 - 2.1)
    for png in ("sparsity_vs_loss.png", "sparsity_vs_throughput.png", "method_heatmap.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_sparse_ft_summary_row_reads_wall_time_memory_and_task_score(tmp_path):
    from subnetscope.cli import prune_report

    fake_run(tmp_path / "new", "gpt2", "masked", 0.5, 0, 2.0, 100)
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    summary.update(wall_seconds=12.5, peak_gpu_memory_gb=None, peak_cpu_rss_gb=1.25, task_metric="accuracy",
                   task_score=0.75)
    (tmp_path / "new" / "summary.json").write_text(json.dumps(summary))
    fake_run(tmp_path / "old", "gpt2", "masked", 0.5, 1, 2.0, 100)  # summary.json from before wall_seconds
    with open(tmp_path / "old" / "metrics.jsonl", "a") as fh:
        fh.write("\n" + json.dumps({"step": 12, "time/elapsed": 7.0}) + "\n")
    rows = {r["run"]: r for r in prune_report.summary_rows(prune_report.folder_runs(str(tmp_path)))}
    assert rows["new"]["wall_seconds"] == 12.5 and rows["old"]["wall_seconds"] == 7.0
    assert rows["new"]["peak_cpu_rss_gb"] == 1.25 and rows["new"]["peak_gpu_memory_gb"] is None
    assert (rows["new"]["task_metric"], rows["new"]["task_score"]) == ("accuracy", 0.75)
    assert rows["old"]["task_metric"] is None and rows["old"]["peak_cpu_rss_gb"] is None


def test_task_records_become_training_texts():
    from subnetscope.data import TASKS

    boolq = TASKS["boolq"][2]({"passage": "Cats purr.", "question": "do cats purr", "answer": True})
    hellaswag = TASKS["hellaswag"][2]({"ctx": "He opens the door", "endings": ["and flies.", "and walks in."],
                                       "label": "1"})
    gsm8k = TASKS["gsm8k"][2]({"question": "2+2?", "answer": "#### 4"})
    assert boolq == "Cats purr.\nQuestion: do cats purr?\nAnswer: yes"
    assert hellaswag == "He opens the door and walks in."
    assert gsm8k == "Question: 2+2?\nAnswer: #### 4"
