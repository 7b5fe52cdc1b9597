"""Text for training: RL prompts (IMDB by name, a local file, or the built-in prompts) and the
fine-tuning tasks (BoolQ, HellaSwag, GSM8K, IMDB by name, or a local file) as plain text."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from .errors import SubnetscopeError

# Openings of film reviews, written for this project: the policy continues them and the reward
# judges the continuation's sentiment.
BUILTIN_PROMPTS = (
    "I went to see this film on a rainy Tuesday, and",
    "The director's last picture was a mess, but this one",
    "From the opening scene it was clear that the cast",
    "My brother talked me into watching this movie, and honestly",
    "The soundtrack alone makes this film",
    "Halfway through the second act, I realised",
    "As a long-time fan of the books, I thought the adaptation",
    "The lead actress carries the whole story, and",
    "I have seen a lot of war films, but this one",
    "The special effects were ambitious, although",
    "This is the kind of comedy that",
    "The screenplay takes its time, and by the end",
    "Watching it again ten years later, the movie",
    "The villain was written with such care that",
    "My kids begged to see this cartoon, and the whole family",
    "The documentary follows three farmers through a hard winter and",
    "For a low-budget horror movie, the atmosphere",
    "The pacing of the first hour is",
    "Critics were divided on this one, but I found",
    "The ending surprised everyone in the theatre because",
    "Every performance in this ensemble piece",
    "The dialogue sounds like real people talking, which",
    "I expected a simple romance, but the film",
    "The cinematography turns an ordinary town into",
    "By the time the credits rolled, I",
    "The sequel had big shoes to fill, and",
    "It is rare for a musical to",
    "The twist in the third act",
    "Our film club chose this title for its",
    "The child actors in this movie",
    "The costumes and sets recreate the period so well that",
    "If you only watch one thriller this year,",
    "The story of two brothers running a bakery",
    "Nothing about the trailer prepared me for",
    "The remake keeps the spirit of the original while",
    "Some scenes drag, yet the overall experience",
    "The chemistry between the two leads",
    "Seen on a small screen, the battle scenes",
    "The animation studio took a risk with this film, and",
    "I left the cinema thinking about",
)
EVAL_PROMPTS = (
    "The acting in this movie was",
    "I would describe this film as",
    "After the first twenty minutes, the plot",
    "The best thing about this picture is",
    "Compared with the novel, the film",
    "My overall impression of the movie is",
    "The director clearly wanted to",
    "The music in the final scene",
)
# `--easy`: placeholder prompts of equal token length; the toy reward ignores what they say.
EASY_PROMPTS = tuple(f"Sample {i:02d}:" for i in range(32))
IMDB_OFFLINE_HINT = "a local file instead, e.g. ../shared/data/imdb/train.jsonl.gz (json/jsonl/csv/txt, optionally .gz)"


TEXT_FIELDS = ("prompt", "text", "review", "query", "content")


def _text_column(columns: list[str], spec: str) -> str:
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    raise SubnetscopeError(f"{spec} has no text field: expected one of {', '.join(TEXT_FIELDS)} (found "
                           f"{', '.join(columns) or 'none'}): rename its text field or column")


# Task name -> (Hub data set, its config, how a record becomes one training text).
TASKS = {
    "boolq": ("google/boolq", None,
              lambda r: f"{r['passage']}\nQuestion: {r['question']}?\nAnswer: {'yes' if r['answer'] else 'no'}"),
    "hellaswag": ("Rowan/hellaswag", None, lambda r: f"{r['ctx']} {r['endings'][int(r['label'])]}"),
    "gsm8k": ("openai/gsm8k", "main", lambda r: f"Question: {r['question']}\nAnswer: {r['answer']}"),
    "imdb": ("imdb", None, None),
}


def _load_records(spec: str, config: str | None = None):
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures become our one-line errors
    datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    if path.exists():
        name = path.name.removesuffix(".gz")
        kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}.get(Path(name).suffix)
        if kind is None:
            raise SubnetscopeError(f"{path}: use a .json, .jsonl, .csv or .txt file (optionally .gz)")
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # `datasets` wraps a bad file in a chain of tracebacks: say what is wrong with it
            raise _diagnose(path, kind, err) from None
    try:
        return datasets.load_dataset(spec, config, split="train")
    except Exception as err:
        raise SubnetscopeError(
            f"cannot load data set {spec!r} through `datasets` ({type(err).__name__}; offline?): "
            f"pass {IMDB_OFFLINE_HINT}"
        ) from None


def _diagnose(path: Path, kind: str, err: Exception) -> SubnetscopeError:
    """Read a local file that `datasets` refused, in plain Python, to name what is wrong with it. Runs
    only after a failure, so a good file is read once."""
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
            raw = fh.read()
    except EOFError:
        return SubnetscopeError(f"{path} is a truncated .gz (the compressed stream ends early): re-download or "
                                "re-compress it")
    except OSError as bad:
        return SubnetscopeError(f"{path} cannot be read ({bad}): pass a readable file (.gz files gzip-compressed)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return SubnetscopeError(f"{path} is not UTF-8 text (byte {raw[bad.start]:#04x} at offset {bad.start}; a "
                                "binary file?): pass a .json/.jsonl/.csv/.txt text file in UTF-8")
    if not text.strip():
        return SubnetscopeError(f"{path} {'is empty' if not text else 'holds only blank lines'}: pass a file with "
                                "one record per line")
    if kind == "json":
        problem = _json_problem(text)
        if problem:
            return SubnetscopeError(f"{path}: {problem}")
    return SubnetscopeError(f"{path} cannot be read as {kind} ({type(err).__name__}: {_cause_line(err)}): check its "
                            "format")


def _json_problem(text: str) -> str | None:
    """What keeps a .json/.jsonl text from being records: a JSON document that is not a list of objects
    (or an object of columns), or, in JSON lines, the first line that is not an object."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as bad:
        document_error = f"it is not valid JSON ({bad.msg} at line {bad.lineno}, column {bad.colno}): fix that line"
    else:
        if isinstance(whole, dict) or (isinstance(whole, list) and all(isinstance(r, dict) for r in whole)):
            return None
        return "its JSON is not records (neither objects nor a list of objects): use one JSON object per line"
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if lines[0][1].strip() in ("[", "{") or lines[0][1].lstrip().startswith("[{"):  # one JSON document, not lines
        return document_error
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as bad:
            return f"line {number} is not valid JSON ({bad.msg}: column {bad.colno}): fix or remove that line"
        if not isinstance(record, dict):
            return f"line {number} is not a JSON object: write one object per line, e.g. {{\"text\": \"...\"}}"
    return None


def _cause_line(err: BaseException) -> str:
    """The innermost cause's first line: `datasets` puts the useful text at the bottom of its chain."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return lines[0][:160] if lines else type(err).__name__


def load_prompts(spec: str, tokenizer, max_prompt_tokens: int, limit: int = 5000, seed: int = 0) -> list[str]:
    """Prompts as text, each cut to its first `max_prompt_tokens` tokens."""
    if spec == "builtin":
        texts = list(BUILTIN_PROMPTS)
    elif spec == "easy":
        texts = list(EASY_PROMPTS)
    else:
        records = _load_records(spec)
        records = records.shuffle(seed=seed).select(range(min(limit, len(records))))
        texts = [t for t in records[_text_column(records.column_names, spec)] if isinstance(t, str) and t.strip()]
        if not texts:
            raise SubnetscopeError(f"{spec} has no non-empty text rows: pass a file whose text field holds text")
    return [truncate_to_tokens(t, tokenizer, max_prompt_tokens) for t in texts]


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts as an instruct model was trained to see them: each a user turn of the tokenizer's chat
    template, ending where the assistant's answer begins. Unchanged when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


def truncate_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    ids = tokenizer(text.replace("<br />", " "), add_special_tokens=False)["input_ids"][:max_tokens]
    return tokenizer.decode(ids)


def load_task_texts(task: str, limit: int = 20000, seed: int = 0) -> list[str]:
    """A fine-tuning task's training texts: a named task through `datasets`, or a local file's text column."""
    hub_id, config, render = TASKS.get(task, (task, None, None))
    records = _load_records(hub_id, config)
    records = records.shuffle(seed=seed).select(range(min(limit, len(records))))
    if render is not None:
        texts = [render(r) for r in records]
    else:
        column = records[_text_column(records.column_names, task)]
        texts = [t.replace("<br />", " ") for t in column if isinstance(t, str)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SubnetscopeError(f"{task} has no non-empty text rows: pass a file whose text field holds text")
    return texts


# A local file stands in for a named task when it has the Hub data set's columns.
TASK_COLUMNS = {"boolq": ("passage", "question", "answer"), "hellaswag": ("ctx", "endings", "label"),
                "gsm8k": ("question", "answer")}
# The split each named task is scored on (GSM8K publishes no validation split).
EVAL_SPLITS = {"boolq": "validation", "hellaswag": "validation", "gsm8k": "test"}


def task_format(task: str, columns: list[str]) -> str | None:
    """The named task these records belong to: the task's own name, else the first whose columns a local
    file has (BoolQ before GSM8K: both have question and answer); None for plain text."""
    if task in TASK_COLUMNS:
        return task
    for name, needed in TASK_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    return None


def task_offline_hint(task: str) -> str:
    """What a named task needs where the Hub is out of reach, in one clause."""
    return (f"pass --task and --eval_data as local json/jsonl files with {task}'s columns "
            f"{', '.join(TASK_COLUMNS[task])}")


def _load_hub_split(task: str, split: str):
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    hub_id, config, _ = TASKS[task]
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:
        raise SubnetscopeError(f"cannot load {hub_id} ({split} split) through `datasets` ({type(err).__name__}; "
                               f"offline?): {task_offline_hint(task)}") from None


def load_task_split(task: str, split: str = "train", limit: int | None = None, seed: int = 0):
    """(format, records) of a task: a named task's split through `datasets` (a local file of that name
    wins), imdb by name, or a local file whose columns tell its format; shuffled with `seed`, the first
    `limit`. The format is a key of TASK_COLUMNS, or None for plain text."""
    if task in TASK_COLUMNS and not Path(task).expanduser().exists():
        records = _load_hub_split(task, split)
    else:
        records = _load_records(TASKS[task][0] if task in TASKS else task)
    records = records.shuffle(seed=seed)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    kind = task_format(task, records.column_names)
    if task in TASK_COLUMNS:
        missing = [c for c in TASK_COLUMNS[task] if c not in records.column_names]
        if missing:
            raise SubnetscopeError(f"{task} records lack the column(s) {', '.join(missing)}: {task_offline_hint(task)}")
    return kind, records


def task_texts(kind: str | None, records, spec: str) -> list[str]:
    """Training texts of task records: rendered as TASKS does for a task format, else the text column."""
    if kind is None:
        column = records[_text_column(records.column_names, spec)]
        texts = [t.replace("<br />", " ") for t in column if isinstance(t, str)]
    else:
        render = TASKS[kind][2]
        texts = []
        for i, record in enumerate(records):
            try:
                texts.append(render(record))
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise SubnetscopeError(f"{spec}: record {i} is not a {kind} record ({type(err).__name__}: {err}): "
                                       f"give every record {kind}'s columns {', '.join(TASK_COLUMNS[kind])}") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SubnetscopeError(f"{spec} has no non-empty text rows: pass a file whose text field holds text")
    return texts


def language_model_windows(spec: str, tokenizer, seq_len: int, limit: int, seed: int) -> list[list[int]]:
    """Plain text cut into consecutive windows of `seq_len` tokens, for continued language-model training:
    a .txt file (optionally .gz) is one document (Tiny Shakespeare), anything else is texts as
    load_task_texts reads them (imdb by name, a local json/jsonl/csv file), each ended by the EOS token."""
    path = Path(spec).expanduser()
    if path.is_file() and path.name.removesuffix(".gz").endswith(".txt"):
        ids = tokenizer(_read_text_file(path), add_special_tokens=False, verbose=False)["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        tokens = token_stream(load_task_texts(spec, limit=limit, seed=seed), tokenizer)
    n = len(tokens) // seq_len
    if n == 0:
        raise SubnetscopeError(f"{spec} has {len(tokens)} tokens, fewer than one window of --seq_len {seq_len}: "
                               "use more text or a shorter --seq_len")
    return tokens[: n * seq_len].view(n, seq_len).tolist()


def _read_text_file(path: Path) -> str:
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
            raw = fh.read()
        return raw.decode("utf-8")
    except (OSError, EOFError) as err:
        raise SubnetscopeError(f"{path} cannot be read ({err}): pass a readable text file") from None
    except UnicodeDecodeError as bad:
        raise SubnetscopeError(f"{path} is not UTF-8 text (offset {bad.start}): pass a text file in UTF-8") from None


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All texts' tokens in one stream, each text followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokens: torch.Tensor, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """`n_batches` batches of consecutive windows from the start of the stream (deterministic)."""
    need = n_batches * batch_size * seq_len
    if len(tokens) < need:
        raise SubnetscopeError(f"calibration data has {len(tokens)} tokens, {need} needed for --calib_batches "
                               f"{n_batches} x {batch_size} x {seq_len}: use more data or fewer/shorter batches")
    return list(tokens[:need].view(n_batches, batch_size, seq_len))


def load_labelled_reviews(spec: str, seed: int, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Reviews and their labels (1 = positive), shuffled with `seed`, the first `limit` of them (all
    by default): `datasets` "imdb" or a local file."""
    records = _load_records(spec)
    if "text" not in records.column_names or "label" not in records.column_names:
        raise SubnetscopeError(f"{spec} needs text and label columns, label 1 = positive (found "
                               f"{records.column_names}): pass {IMDB_OFFLINE_HINT}")
    records = records.shuffle(seed=seed)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return [t.replace("<br />", " ") for t in records["text"]], [int(x) for x in records["label"]]
