"""Rewards, data, model loading, presets and error paths of main_grpo.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetscope.checkpoint import open_checkpoint
from subnetscope.cli import grpo as grpo_cli
from subnetscope.data import load_prompts
from subnetscope.errors import SubnetscopeError
from subnetscope.models import (
    load_causal_lm,
    tiny_gemma3n_config,
    tiny_model,
    word_tokenizer,
)
from subnetscope.rewards import ClassifierReward, VaderReward

from .conftest import IMDB_JSONL, TINY_GPT2_DIR, requires_shared

ROOT = Path(__file__).resolve().parents[1]


def tiny_classifier(folder: Path, labels: dict[int, str]) -> Path:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tok = word_tokenizer()
    config = DistilBertConfig(vocab_size=len(tok), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
                              pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_classifier_reward_is_the_positive_logit(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_classifier(tmp_path / "clf", {0: "NEGATIVE", 1: "POSITIVE"})
    reward = ClassifierReward(str(folder), "cpu", batch_size=2)
    prompts, completions = ["the film was", "the plot is", "my kids"], [" good", " boring and dull", " love it"]
    got = reward(prompts, completions, [[1], [2], [3]])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for p, c, value in zip(prompts, completions, got):
        with torch.no_grad():
            logits = model(**tok(p + c, return_tensors="pt")).logits[0]
        assert value == pytest.approx(float(logits[1]), abs=1e-5)


def test_classifier_without_positive_label_lists_its_labels(tmp_path):
    folder = tiny_classifier(tmp_path / "clf", {0: "ANGER", 1: "JOY"})
    with pytest.raises(SubnetscopeError, match=r"no POSITIVE label \(its labels: \['ANGER', 'JOY'\]\)"):
        ClassifierReward(str(folder), "cpu")


def test_vader_scores_sentiment():
    scores = VaderReward()(["", ""], ["a wonderful, lovely film", "an awful, boring mess"], [[], []])
    assert scores[0] > 0.5 and scores[1] < -0.5


@requires_shared(IMDB_JSONL)
@requires_shared(TINY_GPT2_DIR)
def test_prompts_from_the_imdb_file_are_cut_to_max_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_GPT2_DIR)
    prompts = load_prompts(str(IMDB_JSONL), tok, max_prompt_tokens=12, limit=50)
    assert len(prompts) == 50
    assert all(len(tok(p)["input_ids"]) <= 13 for p in prompts)  # decode/encode may merge one token
    assert all("<br" not in p for p in prompts)


def test_local_text_and_csv_files(tmp_path):
    tok = word_tokenizer()
    (tmp_path / "p.txt").write_text("the film was good\nthe plot is dull\n")
    assert load_prompts(str(tmp_path / "p.txt"), tok, 3) == ["the film was", "the plot is"]
    (tmp_path / "p.csv").write_text("review,label\nthe acting was fine,1\n")
    assert load_prompts(str(tmp_path / "p.csv"), tok, 10) == ["the acting was fine"]
    (tmp_path / "p.parquet").write_text("x")
    with pytest.raises(SubnetscopeError, match=".json, .jsonl, .csv or .txt"):
        load_prompts(str(tmp_path / "p.parquet"), tok, 10)


def test_imdb_by_name_offline_names_the_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SubnetscopeError, match="shared/data/imdb/train.jsonl.gz"):
        load_prompts("imdb", word_tokenizer(), 10)


def test_gemma3n_multimodal_checkpoint_loads_as_text_model(tmp_path):
    from safetensors.torch import save_file
    from transformers import Gemma3nConfig, Gemma3nForCausalLM

    text = tiny_model("gemma3n", vocab_size=300)
    Gemma3nConfig(text_config=tiny_gemma3n_config(vocab_size=300).to_dict()).save_pretrained(tmp_path)
    state = {"model.language_model." + k[len("model."):]: v for k, v in text.state_dict().items()
             if k.startswith("model.")}
    state["model.vision_tower.timm_model.stem.weight"] = torch.zeros(3)  # towers are left alone
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    loaded = load_causal_lm(str(tmp_path), torch.bfloat16)
    assert isinstance(loaded, Gemma3nForCausalLM) and loaded.dtype == torch.bfloat16
    for name, value in text.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16))
    with pytest.raises(SubnetscopeError, match="float16"):
        load_causal_lm(str(tmp_path), torch.float16)


def test_presets_do_not_follow_the_models_name():
    """A Gemma model gets what every model gets: no Adafactor, checkpointing or precision of its own."""
    parse = grpo_cli.build_parser().parse_args
    for policy in ("google/gemma-3n-E2B-it", "gpt2"):
        cfg = grpo_cli.grpo_config(parse(["--short", "--policy", policy]))
        assert (cfg.max_steps, cfg.save_every, cfg.optimizer, cfg.gradient_checkpointing, cfg.precision) == \
            (10, 5, "adamw", False, "auto")
    cfg = grpo_cli.grpo_config(parse(["--short", "--policy", "google/gemma-3n-E2B-it", "--optimizer", "adafactor"]))
    assert cfg.optimizer == "adafactor"
    cfg = grpo_cli.grpo_config(parse(["--smoke", "--max_steps", "3"]))
    assert cfg.policy == "tiny-gemma3n" and cfg.max_steps == 3


def test_full_checkpoints_are_plain_safetensors_and_resume(tmp_path):
    from subnetscope.grpo import GRPOConfig, GRPOTrainer

    cfg = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", batch_size=2, group_size=2,
               max_new_tokens=4, lr=1e-2, save_every=1, eval_every=10, full_checkpoints=True, no_tqdm=True,
               output_dir=str(tmp_path / "run"))
    GRPOTrainer(GRPOConfig(max_steps=2, **cfg)).train()
    step2 = tmp_path / "run" / "step_2" / "model.safetensors"
    assert step2.exists() and not (tmp_path / "run" / "step_2" / "subnet.safetensors").exists()
    resumed = GRPOTrainer(GRPOConfig(max_steps=3, resume=True, **cfg))
    assert resumed.start_step == 2
    weights = open_checkpoint(str(tmp_path / "run" / "step_2"))
    for name, p in resumed.params.items():
        assert torch.equal(p.detach(), weights.get(name))


def test_cuda_out_of_memory_names_the_remedies(monkeypatch, capsys):
    def boom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(grpo_cli.GRPOTrainer, "__init__", boom)
    with pytest.raises(SystemExit) as exc:
        grpo_cli.main(["--easy", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for remedy in ("--optimizer adafactor", "--gradient_checkpointing", "--ref_device cpu", "--reward_device cpu",
                   "--max_new_tokens"):
        assert remedy in err


@pytest.mark.slow
def test_batch_that_does_not_split_over_processes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "main_grpo.py"), "--easy", "--policy", "tiny-gpt2", "--device", "cpu",
                             "--batch_size", "3", "--max_steps", "1", "--output_dir", str(tmp_path / "r"), "--no_tqdm"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "error: --batch_size 3 does not split over 2 processes: use a multiple of 2" in result.stderr
    assert "Traceback (most recent call last)" not in result.stderr.split("error: --batch_size")[0][-500:]


def test_random_shaped_policies_have_the_real_shapes():
    from transformers import Gemma3nForCausalLM, GPT2LMHeadModel

    from subnetscope.models import random_shaped_config

    with torch.device("meta"):
        gemma = Gemma3nForCausalLM(random_shaped_config("random-gemma3n-e2b", 50257))
        gpt2 = GPT2LMHeadModel(random_shaped_config("random-gpt2-medium", 50257))
    shapes = {n: tuple(p.shape) for n, p in gemma.named_parameters()}
    assert sum(1 for n in shapes if n.endswith("mlp.gate_proj.weight")) == 30
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.0.laurel.linear_left.weight"] == (64, 2048)
    assert shapes["model.embed_tokens_per_layer.weight"] == (50257, 30 * 256)
    assert 354e6 < sum(p.numel() for p in gpt2.parameters()) < 356e6  # GPT-2-medium: 355M


@requires_shared(TINY_GPT2_DIR)
def test_random_shaped_policy_takes_the_given_tokenizer():
    from subnetscope.models import load_tokenizer

    tok = load_tokenizer("random-gpt2-medium", str(TINY_GPT2_DIR))
    assert len(tok) == 50257 and tok.pad_token == tok.eos_token
