"""Task metrics of a fine-tuned model, as the sparse fine-tuning guide reports them: accuracy on BoolQ
and HellaSwag (multiple choice: the option whose tokens the model gives the highest log-likelihood
after the context, summed over the option's tokens, as lm-evaluation-harness's `acc`), and exact
match of GSM8K's final answers (greedy decoding; the number after "####", else the last number).

Prompts are the training texts' own layout (data.TASKS): BoolQ "passage\\nQuestion: q?\\nAnswer:" with
the options " yes" / " no", HellaSwag the context with each ending after a space, GSM8K
"Question: q\\nAnswer:".
"""
from __future__ import annotations

import re
from contextlib import nullcontext

import torch

from .errors import SubnetscopeError

METRICS = {"boolq": "accuracy", "hellaswag": "accuracy", "gsm8k": "exact_match"}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _truth(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"answer {value!r} is not true or false")


def multiple_choice(kind: str, record: dict) -> tuple[str, list[str], int]:
    """(context, options, index of the right option) of a BoolQ or HellaSwag record."""
    if kind == "boolq":
        context = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
        return context, [" yes", " no"], 0 if _truth(record["answer"]) else 1
    endings = record["endings"]
    if not isinstance(endings, list) or not endings:
        raise ValueError("endings is not a list of strings")
    label = int(record["label"])
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is not an index of its {len(endings)} endings")
    return record["ctx"], [" " + str(e).strip() for e in endings], label


def final_answer(text: str) -> str | None:
    """GSM8K's final answer in a text: the first number after "####", else the last number (before a
    next "Question:" the model went on to write); commas dropped, 18.0 written 18."""
    text = text.split("\nQuestion:", 1)[0]
    if "####" in text:
        found = NUMBER.findall(text.split("####", 1)[1])[:1]
    else:
        found = NUMBER.findall(text)[-1:]
    if not found:
        return None
    number = found[0].replace(",", "")
    value = float(number)
    return str(int(value)) if value == int(value) else str(value)


def _max_length(model) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024)


@torch.no_grad()
def option_logprobs(model, tokenizer, context: str, options: list[str], autocast=nullcontext) -> list[float]:
    """log p(option | context) of each option, summed over its tokens; a context too long for the model
    loses its start (the option is always whole)."""
    device = next(model.parameters()).device
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    conts = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    limit = _max_length(model)
    rows = [(ctx + c)[-limit:] for c in conts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logps = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (row, cont) in enumerate(zip(rows, conts)):
        start = len(row) - len(cont)  # position of the option's first token
        targets = torch.tensor(cont, device=device)
        out.append(float(logps[i, start - 1: len(row) - 1].gather(-1, targets[:, None]).sum()))
    return out


def choice_accuracy(model, tokenizer, kind: str, records, autocast=nullcontext) -> float:
    """Share of records whose right option has the highest log-likelihood (ties: the first option)."""
    right = 0
    for i, record in enumerate(records):
        try:
            context, options, label = multiple_choice(kind, record)
        except (KeyError, TypeError, ValueError) as err:
            raise SubnetscopeError(f"evaluation record {i} is not a {kind} record ({type(err).__name__}: {err}): "
                                   "check --eval_data's columns") from None
        scores = option_logprobs(model, tokenizer, context, options, autocast)
        right += int(max(range(len(scores)), key=scores.__getitem__) == label)
    return right / len(records)


def gsm8k_exact_match(model, tokenizer, records, batch_size: int, max_new_tokens: int,
                      autocast=nullcontext) -> float:
    """Share of records whose greedy answer's final number equals the reference's (after "####")."""
    from .sampling import generate

    golds = [final_answer(str(r["answer"])) for r in records]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in records]
    right = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        with autocast():
            texts = generate(model, tokenizer, batch, torch.arange(len(batch)), seed=0, step=0,
                             max_new_tokens=max_new_tokens, greedy=True).texts
        right += sum(g is not None and final_answer(t) == g for t, g in zip(texts, golds[start:]))
    return right / len(records)


def task_score(model, tokenizer, kind: str, records, batch_size: int, max_new_tokens: int,
               autocast=nullcontext) -> dict:
    """{task_metric, task_score, eval_examples} of a model on a task's evaluation records."""
    if not len(records):
        raise SubnetscopeError(f"no {kind} records to evaluate on: pass --eval_data with some")
    was_training = model.training
    model.eval()
    if kind == "gsm8k":
        score = gsm8k_exact_match(model, tokenizer, records, batch_size, max_new_tokens, autocast)
    else:
        score = choice_accuracy(model, tokenizer, kind, records, autocast)
    model.train(was_training)
    return {"task_metric": METRICS[kind], "task_score": score, "eval_examples": len(records)}
