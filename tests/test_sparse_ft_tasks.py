"""Sparse fine-tuning's task metrics (BoolQ / HellaSwag accuracy by option log-likelihood, GSM8K exact
match), wall time and peak memory, the shared precision flags, and the sweep driver (masks → training →
analysis), each against an independent computation; the task files are small local files with the
Hub data sets' columns, written here."""
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetscope import task_metrics
from subnetscope.data import load_task_split, task_texts
from subnetscope.errors import SubnetscopeError
from subnetscope.models import load_causal_lm, load_tokenizer
from subnetscope.sparse_ft import SparseFTConfig, SparseFTTrainer
from subnetscope.sparse_sweep import expand_sweep
from subnetscope.task_metrics import (
    choice_accuracy,
    final_answer,
    gsm8k_exact_match,
    multiple_choice,
)

from .conftest import TINY_GPT2_DIR, at_once, requires_shared

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "blue", "river", "house", "tree"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def task_file(path: Path, kind: str, n: int = 40, seed: int = 0) -> Path:
    """n records with the columns of BoolQ, HellaSwag or GSM8K, one JSON object a line."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if kind == "boolq":
            rows.append({"passage": _sentence(rng, 20), "question": _sentence(rng, 5)[:-1].lower(),
                         "answer": bool(i % 2)})
        elif kind == "hellaswag":
            rows.append({"ctx": _sentence(rng, 12), "endings": [_sentence(rng, 4) for _ in range(4)],
                         "label": str(i % 4)})
        else:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            rows.append({"question": f"{_sentence(rng, 8)} What is {a} plus {b}?",
                         "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def independent_logprob(model, tokenizer, context: str, option: str) -> float:
    """log p(option | context): one unpadded forward of the whole sequence, summed by hand."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    opt = tokenizer(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + opt])).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[len(ctx) - 1 + j, t]) for j, t in enumerate(opt))


def independent_accuracy(model, tokenizer, kind: str, records) -> float:
    right = 0
    for r in records:
        context, options, label = multiple_choice(kind, r)
        scores = [independent_logprob(model, tokenizer, context, o) for o in options]
        right += scores.index(max(scores)) == label
    return right / len(records)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer(str(TINY_GPT2_DIR))
    return load_causal_lm(str(TINY_GPT2_DIR), torch.float32).eval(), tokenizer


@pytest.mark.parametrize("text, expected", [
    ("She pays 3 + 4 = 7 dollars.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is 18.0", "18"),
    ("so 2.50 each", "2.5"),
    ("first 3 then 4 then -12.\nQuestion: what is 99?", "-12"),
    ("no number here", None),
    ("#### 5 and later 6", "5"),
])
def test_final_answer_follows_gsm8k_conventions(text, expected):
    assert final_answer(text) == expected


def test_multiple_choice_layout_matches_the_training_text():
    boolq = {"passage": "Cats purr.", "question": "do cats purr", "answer": False}
    assert multiple_choice("boolq", boolq) == ("Cats purr.\nQuestion: do cats purr?\nAnswer:", [" yes", " no"], 1)
    hella = {"ctx": "He opens the door", "endings": ["and flies.", "and walks in."], "label": "1"}
    assert multiple_choice("hellaswag", hella) == ("He opens the door", [" and flies.", " and walks in."], 1)
    with pytest.raises(ValueError, match="label 2"):
        multiple_choice("hellaswag", {**hella, "label": 2})


@requires_shared(TINY_GPT2_DIR)
def test_option_logprobs_equal_an_unpadded_forward(tiny):
    model, tokenizer = tiny
    options = [" yes", " no", " the big red river flows"]  # different lengths: the batch is padded
    ours = task_metrics.option_logprobs(model, tokenizer, "Is the cat on the mat?\nAnswer:", options)
    expected = [independent_logprob(model, tokenizer, "Is the cat on the mat?\nAnswer:", o) for o in options]
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-5)


@requires_shared(TINY_GPT2_DIR)
def test_choice_accuracy_counts_the_likeliest_option(tiny, tmp_path):
    model, tokenizer = tiny
    _, records = load_task_split(str(task_file(tmp_path / "b.jsonl", "boolq", n=8)), limit=8)
    records = [dict(r) for r in records]
    preferred = []
    for r in records:
        context, options, _ = multiple_choice("boolq", r)
        scores = [independent_logprob(model, tokenizer, context, o) for o in options]
        preferred.append(scores.index(max(scores)) == 0)  # the model prefers " yes"
    # the right answer is the model's choice for the first 3 records and the other option for the rest
    for i, r in enumerate(records):
        r["answer"] = preferred[i] if i < 3 else not preferred[i]
    assert choice_accuracy(model, tokenizer, "boolq", records) == 3 / 8


def test_gsm8k_exact_match_compares_final_numbers(monkeypatch):
    answers = iter(["He has 12 apples.\n#### 12", "It costs $1,000 in all", "#### 7\nQuestion: next 9", "none"])

    class Rollout:
        def __init__(self, n):
            self.texts = [next(answers) for _ in range(n)]

    monkeypatch.setattr("subnetscope.sampling.generate", lambda model, tok, prompts, *a, **k: Rollout(len(prompts)))
    records = [{"question": "q", "answer": f"... #### {g}"} for g in ("12", "1000", "8", "3")]
    model = torch.nn.Linear(1, 1)
    assert gsm8k_exact_match(model, None, records, batch_size=3, max_new_tokens=4) == 2 / 4


def test_local_task_files_are_recognised_by_their_columns(tmp_path):
    for kind in ("boolq", "hellaswag", "gsm8k"):
        found, records = load_task_split(str(task_file(tmp_path / f"{kind}.jsonl", kind, n=5)))
        assert found == kind and len(task_texts(found, records, kind)) == 5
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "a review"}) + "\n")
    assert load_task_split(str(plain))[0] is None


def ft_config(tmp_path: Path, task: Path, **extra) -> SparseFTConfig:
    return SparseFTConfig(**{"policy": str(TINY_GPT2_DIR), "task": str(task), "seq_len": 32, "batch_size": 4,
                             "max_steps": 4, "save_every": 2, "log_every": 2, "eval_every": 2, "eval_batches": 1,
                             "val_fraction": 0.25, "eval_max_new_tokens": 8, "device": "cpu", "precision": "fp32",
                             "output_dir": str(tmp_path / "run"), "no_tqdm": True, **extra})


def independent_exact_match(model, tokenizer, records) -> float:
    """Greedy answers one record at a time (no padding), through model.generate."""
    right = 0
    for r in records:
        ids = tokenizer(f"Question: {r['question']}\nAnswer:", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        right += final_answer(text) == final_answer(r["answer"])
    return right / len(records)


@requires_shared(TINY_GPT2_DIR)
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["boolq", "hellaswag", "gsm8k"])
def test_sparse_ft_reports_the_final_models_task_metric_time_and_memory(tmp_path, kind):
    train = task_file(tmp_path / "train.jsonl", kind)
    held = task_file(tmp_path / "eval.jsonl", kind, n=6, seed=1)
    cfg = ft_config(tmp_path, train, eval_data=str(held), view_dtype="bfloat16", lr=1e-2)
    summary = SparseFTTrainer(cfg).train()
    run = tmp_path / "run"
    final = run / "final"
    assert {str(t.dtype) for t in load_file(str(final / "model.safetensors")).values()} == {"torch.bfloat16"}
    model = load_causal_lm(str(final), torch.float32).eval()
    tokenizer = load_tokenizer(str(final))
    _, records = load_task_split(str(held), limit=6)
    if kind == "gsm8k":
        expected, metric = independent_exact_match(model, tokenizer, records), "exact_match"
    else:
        expected, metric = independent_accuracy(model, tokenizer, kind, records), "accuracy"
    assert summary["task_metric"] == metric and summary["eval_examples"] == 6
    # final/ is the bf16 rounding of the fp32 model that was scored: the same choices on these records
    assert summary["task_score"] == pytest.approx(expected)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["task_score"] == summary["task_score"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 4, f"eval/{metric}": summary["task_score"]}
    elapsed = [r["time/elapsed"] for r in records if "time/elapsed" in r]
    assert elapsed == sorted(elapsed) and 0 < elapsed[-1] <= on_disk["wall_seconds"]
    assert on_disk["peak_gpu_memory_gb"] is None and 0.05 < on_disk["peak_cpu_rss_gb"] < 64
    config = json.loads((run / "config.json").read_text())
    assert config["precision_used"] == "fp32" and config["view_dtype_used"] == "bfloat16"
    assert config["task_format"] == kind


@requires_shared(TINY_GPT2_DIR)
@pytest.mark.slow
def test_resumed_run_adds_its_earlier_sessions_time(tmp_path):
    train = task_file(tmp_path / "train.jsonl", "boolq")
    SparseFTTrainer(ft_config(tmp_path, train, max_steps=2)).train()
    state = torch.load(tmp_path / "run" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    resumed = SparseFTTrainer(ft_config(tmp_path, train, max_steps=4, resume=True))
    assert resumed.step == 2 and resumed.elapsed == state["elapsed"] > 0
    summary = resumed.train()
    assert summary["wall_seconds"] > state["elapsed"]


@requires_shared(TINY_GPT2_DIR)
@pytest.mark.parametrize("extra, message", [
    ({"eval_data": "EVAL"}, "holds hellaswag records, not boolq ones"),
    ({"task": "PLAIN", "eval_data": "EVAL"}, "plain text, which has no task metric"),
    ({"eval_data": "missing.jsonl"}, "--eval_data missing.jsonl does not exist"),
    ({"precision": "half"}, "--precision 'half'"),
])
def test_bad_evaluation_settings_are_refused_before_anything_is_written(tmp_path, extra, message):
    train = task_file(tmp_path / "train.jsonl", "boolq")
    other = task_file(tmp_path / "hella.jsonl", "hellaswag", n=4)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": " ".join(WORDS * 4)}) + "\n" for _ in range(20)))
    swap = {"EVAL": str(other), "PLAIN": str(plain)}
    extra = {k: swap.get(v, v) for k, v in extra.items()}
    with pytest.raises(SubnetscopeError, match=message):
        SparseFTTrainer(ft_config(tmp_path, Path(extra.pop("task", train)), **extra))
    assert not (tmp_path / "run").exists()


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main_sparse_ft.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, check=False)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


NAMED_TASKS = ("boolq", "hellaswag", "gsm8k")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """This file's refused commands, all at once (each is refused after its imports): main_sparse_ft.py with the
    old --dtype flag and key and with each named task offline, and run_sparse_sweep.py with a bad value. Their
    folder, and each result by name."""
    import os

    import yaml

    tmp = tmp_path_factory.mktemp("refusals")
    config = tmp / "c.yaml"
    config.write_text("dtype: float32\nmax_steps: 2\n")
    sweep = tmp / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({**sweep_file(tmp, **{"train.lr": "fast"}), "output_dir": str(tmp / "o")}))
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    commands = {"dtype_flag": lambda: cli("--dtype", "bfloat16", "--output_dir", str(tmp / "a")),
                "dtype_key": lambda: cli("--config", str(config), "--output_dir", str(tmp / "b")),
                **{task: lambda task=task: cli("--task", task, "--output_dir", str(tmp / task), env=offline)
                   for task in NAMED_TASKS},
                "sweep": lambda: subprocess.run([sys.executable, str(ROOT / "run_sparse_sweep.py"), "--config",
                                                 str(sweep)], capture_output=True, text=True, cwd=ROOT, check=False)}
    return tmp, dict(zip(commands, at_once(*commands.values())))


@pytest.mark.slow
def test_old_dtype_flag_and_key_say_what_replaced_them(refusals):
    tmp, results = refusals
    line = one_error_line(results["dtype_flag"])
    assert "--dtype" in line and "--precision" in line and "--view_dtype" in line
    line = one_error_line(results["dtype_key"])
    assert "--dtype" in line and "--precision" in line
    assert not (tmp / "a").exists() and not (tmp / "b").exists()


@pytest.mark.slow
@pytest.mark.parametrize("task, hub_id, columns", [("boolq", "google/boolq", "passage, question, answer"),
                                                   ("hellaswag", "Rowan/hellaswag", "ctx, endings, label"),
                                                   ("gsm8k", "openai/gsm8k", "question, answer")])
def test_named_task_offline_says_in_one_line_what_it_needs(refusals, task, hub_id, columns):
    tmp, results = refusals
    line = one_error_line(results[task])
    assert hub_id in line and "--eval_data" in line and columns in line
    assert not (tmp / task).exists()


# The sweep driver

def sweep_file(tmp_path: Path, **overrides) -> dict:
    train = task_file(tmp_path / "train.jsonl", "boolq")
    sweep = {"policy": str(TINY_GPT2_DIR), "device": "cpu", "sparsity": [0.5], "dense": True,
             "masks": {"method": "unstructured", "importance": "magnitude"},
             "train": {"task": str(train), "method": "masked", "seq_len": 32, "batch_size": 4, "max_steps": 2,
                       "save_every": 2, "log_every": 2, "eval_every": 2, "eval_batches": 1, "val_fraction": 0.25,
                       "precision": "fp32", "seed": [0, 1]}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            sweep[section][field] = value
        else:
            sweep[section] = value
    return sweep


@pytest.mark.parametrize("override, message", [
    ({"colour": 1}, "unknown top-level key"),
    ({"model": "gpt2"}, "sweep: model is now policy"),
    ({"masks.importance": "bogus"}, "invalid choice: 'bogus'"),
    ({"masks.learning_rate": 1}, "learning_rate is not a compute_masks.py setting"),
    ({"train.dtype": "float32"}, "dtype was replaced by precision"),
    ({"train.lr_rate": 1}, "lr_rate is not a main_sparse_ft.py setting"),
    ({"train.lr": "fast"}, "lr='fast' is not a valid value"),
    ({"train.method": "prune"}, "--method 'prune'"),
    ({"sparsity": [0.5, 1.2]}, "sparsity 1.2"),
])
def test_bad_sweep_is_refused_before_anything_runs(tmp_path, override, message):
    with pytest.raises(SubnetscopeError, match=message):
        expand_sweep(sweep_file(tmp_path, **override), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_sweep_file_is_one_error_line_and_writes_nothing(refusals):
    tmp, results = refusals
    line = one_error_line(results["sweep"])
    assert "lr='fast'" in line and "expected float" in line and not (tmp / "o").exists()


def test_sweep_grid_crosses_masks_levels_and_training_settings(tmp_path):
    sweep = sweep_file(tmp_path, sparsity=[0.5, 0.7], **{"masks.method": ["unstructured", "random"],
                                                         "train.method": ["masked", "lora"]})
    masks, runs = expand_sweep(sweep, tmp_path / "out")
    assert len(masks) == 2 and all(len(m.files) == 2 for m in masks)
    # (2 mask methods x 2 levels + 1 dense) x 2 training methods x 2 seeds
    assert len(runs) == 20 and len({r.name for r in runs}) == 20
    dense = [r for r in runs if r.mask is None]
    assert len(dense) == 4 and all(r.settings["mask"] is None for r in dense)
    masked = [r for r in runs if r.mask is not None]
    assert all(Path(r.settings["mask"]) == r.mask.files[r.sparsity] for r in masked)
    assert {Path(r.settings["mask"]).name for r in masked} == {
        "mask_unstructured_magnitude_matrix_s0.50.safetensors", "mask_unstructured_magnitude_matrix_s0.70.safetensors",
        "mask_random_random_matrix_s0.50.safetensors", "mask_random_random_matrix_s0.70.safetensors"}


@requires_shared(TINY_GPT2_DIR)
@pytest.mark.slow
def test_sweep_runs_masks_training_and_analysis_and_resumes(tmp_path):
    import yaml

    sweep = sweep_file(tmp_path, dense=False, **{"train.seed": 0, "train.seq_len": [32, 100000]})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**sweep, "output_dir": str(tmp_path / "out")}))
    command = [sys.executable, str(ROOT / "run_sparse_sweep.py"), "--config", str(path)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    out = tmp_path / "out"
    # seq_len 100000 is longer than the task's text: that run fails, is named, and the sweep goes on
    assert first.returncode == 1 and "1 of 2 runs failed" in first.stderr, first.stderr
    mask = out / "masks" / "masks" / "mask_unstructured_magnitude_matrix_s0.50.safetensors"
    assert mask.is_file()
    with open(out / "analysis" / "sweep_summary.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "unstructured_magnitude_matrix_s0.50__seq_len=32": "ok",
        "unstructured_magnitude_matrix_s0.50__seq_len=100000": "failed"}
    row = rows["unstructured_magnitude_matrix_s0.50__seq_len=32"]
    summary = json.loads((out / "runs" / row["run"] / "summary.json").read_text())
    assert summary["wall_seconds"] > 0 and float(row["wall_seconds"]) == pytest.approx(summary["wall_seconds"])
    assert row["task_metric"] == "accuracy" and float(row["task_score"]) == pytest.approx(summary["task_score"])
    assert row["mask_violations"] == "0" and float(row["final_sparsity"]) == pytest.approx(0.5)
    assert "too few tokens" in rows["unstructured_magnitude_matrix_s0.50__seq_len=100000"]["error"]
    assert (out / "analysis" / "summary.csv").is_file()  # prune_report.py's tables beside the sweep's
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert again.returncode == 1 and again.stdout.count("done before, skipped") == 1
    assert "masks masks: found" in again.stdout
