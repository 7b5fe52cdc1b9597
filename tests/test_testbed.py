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
from subnetscope.errors import SubnetscopeError

from .conftest import IMDB_JSONL, TINY_GPT2_DIR, at_once, requires_shared

ROOT = Path(__file__).resolve().parents[1]
pytestmark = requires_shared(IMDB_JSONL)


def run_testbed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "testbed.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def testbed_and_refusal(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The tiny testbed built while (side by side) a study is asked of a folder that holds none: the testbed's
    folder, the build's result and the refused study's."""
    out = tmp_path_factory.mktemp("testbed")
    none = tmp_path_factory.mktemp("no_testbed")
    result, refused = at_once(
        lambda: run_testbed("build", "--tiny", "--data", str(IMDB_JSONL), "--tokenizer", str(TINY_GPT2_DIR),
                            "--output_dir", str(out), "--device", "cpu"),
        lambda: run_testbed("study", "--testbed", str(none / "none"), "--output_dir", str(none / "s")))
    return out, result, refused


@pytest.fixture(scope="module")
def testbed(testbed_and_refusal) -> Path:
    out, result, _ = testbed_and_refusal
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
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


def _fraction_changed(base, tuned, names) -> float:
    changed = sum(int((base.get(n) != tuned.get(n)).sum()) for n in names)
    return changed / sum(base.get(n).numel() for n in names)


def check_precision_split(split: dict, out: Path, testbed: Path) -> None:
    """The main runs were fp32 (auto on a CPU), so the split trained GRPO under mixed precision and
    under pure bf16: its bf16 view equals the stored bf16 checkpoints' diff, its master fraction the
    fp32 masters' diff from the fp32 testbed policy, and the bf16 run's equals its checkpoints' diff."""
    mixed, bf16 = out / "precision_grpo_mixed", out / "precision_grpo_bf16"
    assert (split["mixed_run"], split["bf16_run"], split["view_dtype"]) == (str(mixed), str(bf16), "bfloat16")
    base, final = open_checkpoint(str(mixed / "base")), open_checkpoint(str(_final(mixed)))
    assert {base.dtype(n) for n in base.names()} == {torch.bfloat16}
    assert split["mixed_bf16_view"]["exact"] == pytest.approx(_fraction_changed(base, final, base.names()))
    masters = open_checkpoint(str(_final(mixed) / "master.safetensors"))
    policy = open_checkpoint(str(testbed / "policy"))
    assert {masters.dtype(n) for n in masters.names()} == {torch.float32}
    master_fraction = _fraction_changed(policy, masters, masters.names())
    assert split["mixed_fp32_master"]["exact"] == pytest.approx(master_fraction)
    assert split["mixed_fp32_master"]["exact"] >= split["mixed_bf16_view"]["exact"]  # a view change needs a master one
    hidden = (master_fraction - split["mixed_bf16_view"]["exact"]) / master_fraction
    assert split["master_updates_hidden_at_bf16"] == pytest.approx(hidden)
    b_base, b_final = open_checkpoint(str(bf16 / "base")), open_checkpoint(str(_final(bf16)))
    assert split["pure_bf16"]["exact"] == pytest.approx(_fraction_changed(b_base, b_final, b_base.names()))


@pytest.mark.slow
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
    check_precision_split(json.loads((out / "precision.json").read_text()), out, testbed)
    subnet = json.loads((out / "subnetwork.json").read_text())
    assert set(subnet["identical_fraction"]) == {"exact", "atol", "relative"}
    table = (out / "table.md").read_text()
    for claim in ("RL sparser than SFT:", "Overlap above chance:", "Near-full-rank updates:", "Precision split",
                  "mixed precision, fp32 master weights", "pure bf16 weights"):
        assert claim in table
    assert "--precision bf16 updates bf16 weights directly" in result.stderr  # the contrast run says what it is
    assert "Changes judged at float32 (the runs' view dtype)." in table  # --precision auto on a CPU: fp32
    assert (out / "sparsity_by_algorithm.png").stat().st_size > 1000 and (out / "overlap_vs_chance.png").exists()


@pytest.mark.slow
def test_study_without_a_testbed_is_one_line(testbed_and_refusal):
    result = testbed_and_refusal[2]
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


def test_study_precision_flags_reach_every_run():
    from subnetscope.cli.testbed import build_parser, command_config
    from subnetscope.matrix import expand
    from subnetscope.study import StudyConfig, study_matrix

    cfg = command_config(build_parser().parse_args(["study", "--precision", "mixed", "--view_dtype", "float16",
                                                    "--no_precision_split", "--seeds", "0"]))
    assert (cfg.precision, cfg.view_dtype, cfg.precision_split) == ("mixed", "float16", False)
    runs = expand(study_matrix(cfg))
    assert len(runs) == 4 and {(r["settings"]["precision"], r["settings"]["view_dtype"]) for r in runs} == {
        ("mixed", "float16")}
    with pytest.raises(SubnetscopeError, match="--precision 'half'"):
        expand(study_matrix(StudyConfig(precision="half", seeds=[0])))
