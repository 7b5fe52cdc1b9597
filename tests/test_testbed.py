"""The testbed (tiny, on the CPU) and the study on it: cards, the reward model as a classifier,
and the study's tables recomputed from the saved checkpoints."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetscope.checkpoint import find_step_checkpoints, open_checkpoint

from .conftest import IMDB_JSONL, TINY_GPT2_DIR, requires_shared

ROOT = Path(__file__).resolve().parents[1]
pytestmark = requires_shared(IMDB_JSONL)


def run_testbed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "testbed.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    result = run_testbed("build", "--tiny", "--data", str(IMDB_JSONL), "--tokenizer", str(TINY_GPT2_DIR),
                         "--output_dir", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


def test_cards_and_the_reward_model_as_a_hub_style_classifier(testbed):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from subnetscope.rewards import ClassifierReward

    policy = json.loads((testbed / "policy" / "testbed_card.json").read_text())
    reward = json.loads((testbed / "reward" / "testbed_card.json").read_text())
    assert policy["metrics"]["heldout_perplexity"] == pytest.approx(math.exp(policy["metrics"]["heldout_loss"]))
    assert policy["samples"] and policy["steps"] == 40 and policy["seed"] == 0
    heldout = [json.loads(line) for line in (testbed / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 100
    model = AutoModelForSequenceClassification.from_pretrained(testbed / "reward").eval()
    tok = AutoTokenizer.from_pretrained(testbed / "reward")
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    with torch.no_grad():
        hits = 0
        for row in heldout:
            enc = tok(row["text"], return_tensors="pt", truncation=True, max_length=model.config.n_positions)
            hits += int(model(**enc).logits.argmax(-1).item() == row["label"])
    assert reward["metrics"]["heldout_accuracy"] == pytest.approx(hits / len(heldout))
    vader = SentimentIntensityAnalyzer()
    vader_hits = sum((vader.polarity_scores(r["text"])["compound"] >= 0) == bool(r["label"]) for r in heldout)
    assert reward["metrics"]["vader_heldout_accuracy"] == pytest.approx(vader_hits / len(heldout))
    scorer = ClassifierReward(str(testbed / "reward"), "cpu")
    assert scorer.positive == 1 and len(scorer(["a"], [" great film"], [[1]])) == 1
    again = run_testbed("build", "--tiny", "--data", str(IMDB_JSONL), "--tokenizer", str(TINY_GPT2_DIR),
                        "--output_dir", str(testbed), "--device", "cpu")
    assert again.returncode == 0 and again.stdout.count("exists: kept") == 2  # finished stages are not rebuilt


def _final(run: Path) -> Path:
    return find_step_checkpoints(str(run))[-1].path


def _changed(run: Path) -> dict[str, torch.Tensor]:
    base, final = open_checkpoint(str(run / "base")), open_checkpoint(str(_final(run)))
    return {n: base.get(n) != final.get(n) for n in base.names()}


def test_study_tables_match_the_checkpoints(testbed, tmp_path):
    out = tmp_path / "study"
    result = run_testbed("study", "--testbed", str(testbed), "--algos", "grpo", "sft", "--seeds", "0", "1",
                         "--max_steps", "2", "--batch_size", "4", "--max_new_tokens", "8", "--max_prompt_tokens", "8",
                         "--device", "cpu", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "results.csv") as fh:
        rows = {(r["algo"], int(r["seed"])): r for r in csv.DictReader(fh)}
    assert set(rows) == {("grpo", 0), ("grpo", 1), ("sft", 0), ("sft", 1)}
    grpo0, grpo1 = out / "runs" / "rl-grpo__seed=0", out / "runs" / "rl-grpo__seed=1"
    c0, c1 = _changed(grpo0), _changed(grpo1)
    total = sum(m.numel() for m in c0.values())
    n0, n1 = sum(int(m.sum()) for m in c0.values()), sum(int(m.sum()) for m in c1.values())
    both = sum(int((c0[n] & c1[n]).sum()) for n in c0)
    assert float(rows[("grpo", 0)]["changed_exact"]) == pytest.approx(n0 / total)
    with open(out / "overlap.csv") as fh:
        exact = next(r for r in csv.DictReader(fh) if r["algo"] == "grpo" and r["rule"] == "exact")
    assert float(exact["jaccard"]) == pytest.approx(both / (n0 + n1 - both))
    assert float(exact["o1_random"]) == pytest.approx(n1 / total)
    precision = json.loads((out / "precision.json").read_text())
    fp32 = out / "precision_grpo_fp32"
    base, final = open_checkpoint(str(fp32 / "base")), open_checkpoint(str(_final(fp32)))
    lost = sum(int(((base.get(n) != final.get(n)) & (base.get(n).bfloat16() == final.get(n).bfloat16())).sum())
               for n in base.names())
    assert precision["vanish_in_bf16"] == pytest.approx(lost / precision["weights"])
    subnet = json.loads((out / "subnetwork.json").read_text())
    assert set(subnet["identical_fraction"]) == {"exact", "atol", "relative"}
    table = (out / "table.md").read_text()
    for claim in ("RL sparser than SFT:", "Overlap above chance:", "Near-full-rank updates:", "Precision split"):
        assert claim in table
    assert (out / "sparsity_by_algorithm.png").stat().st_size > 1000 and (out / "overlap_vs_chance.png").exists()


def test_study_without_a_testbed_is_one_line(tmp_path):
    result = run_testbed("study", "--testbed", str(tmp_path / "none"), "--output_dir", str(tmp_path / "s"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "build the testbed first" in lines[0], result.stderr


@pytest.mark.parametrize("batch", [4, 6, 16, 24])
def test_study_runs_are_valid_configs_for_every_batch(batch):
    from subnetscope.matrix import expand
    from subnetscope.study import StudyConfig, study_matrix

    runs = expand(study_matrix(StudyConfig(batch_size=batch, seeds=[0])))  # every run's config validated
    assert {r["task"] for r in runs} == {"rl-grpo", "rl-ppo", "sft", "dpo"}
    ppo = next(r for r in runs if r["task"] == "rl-ppo")["settings"]
    assert batch % ppo["mini_batch_size"] == 0
