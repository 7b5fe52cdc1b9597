"""A pretrained testbed from real data: a GPT-2-architecture policy pretrained on IMDB reviews and a
sentiment classifier trained on IMDB's labels, for fine-tuning studies where the Hub is out of reach.

    testbed/policy/   GPT2LMHeadModel + GPT-2 tokenizer (save_pretrained) + testbed_card.json
    testbed/reward/   GPT2ForSequenceClassification with id2label NEGATIVE/POSITIVE, usable as
                      `--reward model --reward_model testbed/reward` like lvwerra/distilbert-imdb
    testbed/heldout.jsonl  the held-out reviews (text, label) neither model trained on

The policy learns next-token prediction on review text (held-out perplexity and sample
continuations in its card); the classifier starts from the policy's transformer and learns
positive vs negative (held-out accuracy in its card, VADER's on the same reviews beside it). Each
stage is written atomically and skipped when it is already there, so a killed build resumes.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import TestbedConfig
from .data import EVAL_PROMPTS, load_labelled_reviews
from .devices import resolve_device
from .errors import SubnetscopeError
from .lm import heldout_loss, lm_loss, sample_windows
from .models import tokenizer_from
from .rundir import durable_save_dir, durable_write_text, save_model
from .seeds import SHORT_STRIDE, stream_seed

CARD = "testbed_card.json"
# the held-out windows of the policy's loss: fixed, so every build and --seed is scored on the same text
HELDOUT_SEED = 31_337
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


def save_with_card(model, tokenizer, card: dict, folder: Path) -> None:
    """The model (rundir.save_model), its tokenizer and the JSON card in one folder, built under a temporary
    name, fsync'd and renamed into place as RunDir writes base/: a killed stage leaves no card, so the next
    build redoes it."""
    def write(tmp: Path) -> None:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD).write_text(json.dumps(card, indent=1))

    durable_save_dir(folder, write)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_policy(cfg: TestbedConfig, tokenizer, train_texts: list[str], heldout_texts: list[str], device: str,
                    folder: Path) -> dict:
    """Next-token pretraining on review text; returns the card's metrics."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .data import token_stream

    train_tokens, heldout_tokens = token_stream(train_texts, tokenizer), token_stream(heldout_texts, tokenizer)
    torch.manual_seed(cfg.seed)
    config = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda s: _cosine(s, cfg.lm_steps, max(1, cfg.lm_steps // 20)))
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.lm_steps), desc="pretrain policy", mininterval=5):
        inputs, targets = sample_windows(train_tokens, cfg.lm_batch_size, cfg.block_size,
                                         seed=stream_seed(cfg.seed, step, SHORT_STRIDE))
        loss = lm_loss(model, inputs, targets, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    batches = max(1, min(20, len(heldout_tokens) // (cfg.lm_batch_size * cfg.block_size)))
    loss = heldout_loss(model, heldout_tokens, cfg.lm_batch_size, cfg.block_size, batches, device, seed=HELDOUT_SEED)
    samples = sample_continuations(model, tokenizer)
    card = {"kind": "policy", "data": cfg.data, "steps": cfg.lm_steps, "seed": cfg.seed, "seconds": seconds,
            "parameters": model.num_parameters(), "train_tokens": len(train_tokens),
            "metrics": {"heldout_loss": loss, "heldout_perplexity": math.exp(loss)}, "samples": samples,
            "config": asdict(cfg)}
    save_with_card(model, tokenizer, card, folder)
    return card


@torch.no_grad()
def sample_continuations(model, tokenizer, n: int = 4, new_tokens: int = 30) -> list[dict]:
    from .sampling import generate

    prompts = list(EVAL_PROMPTS[:n])
    rows = torch.arange(len(prompts))
    greedy = generate(model, tokenizer, prompts, rows, seed=0, step=0, max_new_tokens=new_tokens, greedy=True)
    sampled = generate(model, tokenizer, prompts, rows, seed=0, step=0, max_new_tokens=new_tokens)
    return [{"prompt": p, "greedy": g, "sampled": s} for p, g, s in zip(prompts, greedy.texts, sampled.texts)]


def _classifier_batches(tokenizer, texts: list[str], labels: list[int], batch_size: int, max_tokens: int,
                        device: str):
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens).to(device)
        yield enc, torch.tensor(labels[i:i + batch_size], device=device)


def train_classifier(cfg: TestbedConfig, tokenizer, policy_dir: Path, texts: list[str], labels: list[int],
                     heldout: tuple[list[str], list[int]], device: str, folder: Path) -> dict:
    """A sentiment classifier that starts from the policy's transformer; returns the card's metrics."""
    from transformers import GPT2ForSequenceClassification

    tokenizer.truncation_side = "left"  # a review's verdict tends to come at its end
    tokenizer.padding_side = "left"  # as before generate stopped setting it on the shared tokenizer
    torch.manual_seed(cfg.seed)
    model = GPT2ForSequenceClassification.from_pretrained(policy_dir, num_labels=2, id2label=LABELS,
                                                          label2id={v: k for k, v in LABELS.items()}).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.clf_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.clf_steps), desc="train reward model", mininterval=5):
        idx = torch.randint(0, len(texts), (cfg.clf_batch_size,), generator=gen).tolist()
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=cfg.block_size).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(**enc).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([labels[i] for i in idx], device=device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for enc, y in _classifier_batches(tokenizer, *heldout, 64, cfg.block_size, device):
            correct += int((model(**enc).logits.argmax(-1) == y).sum())
    accuracy = correct / len(heldout[1])
    card = {"kind": "reward", "data": cfg.data, "steps": cfg.clf_steps, "seed": cfg.seed, "seconds": seconds,
            "labels": LABELS, "metrics": {"heldout_accuracy": accuracy,
                                          "vader_heldout_accuracy": vader_accuracy(*heldout),
                                          "heldout_reviews": len(heldout[1]),
                                          "heldout_positive_share": sum(heldout[1]) / len(heldout[1])},
            "config": asdict(cfg)}
    save_with_card(model, tokenizer, card, folder)
    return card


def vader_accuracy(texts: list[str], labels: list[int]) -> float:
    """VADER's compound score >= 0 read as positive, on the same reviews."""
    from .rewards import VaderReward

    scores = VaderReward()([""] * len(texts), texts, [[]] * len(texts))
    return sum((score >= 0) == bool(y) for score, y in zip(scores, labels)) / len(labels)


def build_testbed(cfg: TestbedConfig, log=print) -> dict[str, dict]:
    """Both models and the held-out reviews; finished stages are read back, not rebuilt."""
    cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    tokenizer = tokenizer_from(cfg.tokenizer, "pass a local folder: --tokenizer ../shared/models/tiny-gpt2 has GPT-2's")
    tokenizer.pad_token = tokenizer.eos_token
    texts, labels = load_labelled_reviews(cfg.data, cfg.seed, cfg.max_reviews)
    n = len(texts) - cfg.heldout_reviews
    if n < 1:
        raise SubnetscopeError(f"{cfg.data} has {len(texts)} reviews: fewer than --heldout_reviews "
                               f"{cfg.heldout_reviews}")
    heldout = (texts[n:], labels[n:])
    out.mkdir(parents=True, exist_ok=True)
    durable_write_text(out / "heldout.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n"
                                                      for t, y in zip(*heldout)))
    cards = {}
    policy_dir, reward_dir = out / "policy", out / "reward"
    if (policy_dir / CARD).is_file():
        cards["policy"] = json.loads((policy_dir / CARD).read_text())
        log(f"{policy_dir} exists: kept")
    else:
        cards["policy"] = pretrain_policy(cfg, tokenizer, texts[:n], heldout[0], device, policy_dir)
    if (reward_dir / CARD).is_file():
        cards["reward"] = json.loads((reward_dir / CARD).read_text())
        log(f"{reward_dir} exists: kept")
    else:
        cards["reward"] = train_classifier(cfg, tokenizer, policy_dir, texts[:n], labels[:n], heldout, device,
                                           reward_dir)
    return cards


if __name__ == "__main__":
    import sys

    from .cli.testbed import main

    sys.exit(main())
