"""Damaged and malformed input files (issue 14): each is refused at open with one line that names the
file and what to do, never a traceback, and before any work or any output file."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from subnetscope.checkpoint import (
    COMPACT_FILE,
    atomic_save_dir,
    check_model_files,
    open_checkpoint,
    read_safetensors_offsets,
    save_compact,
)
from subnetscope.data import load_labelled_reviews, load_prompts, load_task_texts
from subnetscope.errors import SubnetscopeError
from subnetscope.masks import MaskSet, load_masks, save_masks
from subnetscope.models import tiny_model, word_tokenizer

from .conftest import at_once, save_state

ROOT = Path(__file__).resolve().parents[1]


class Custom:
    """A class the weights-only unpickler refuses: what a pickled training object looks like."""

    def __init__(self):
        self.weight = torch.zeros(2)


def one_line(call, *needles: str) -> str:
    """The SubnetscopeError that `call` raises: one line holding every needle."""
    with pytest.raises(SubnetscopeError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def safetensors_file(path: Path) -> bytes:
    save_file({"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}, str(path))
    return path.read_bytes()


# -- 1. a sharded model's index -----------------------------------------------------------------

@pytest.mark.parametrize("index, problem", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"metadata": {"total_size": 4}}), "has no usable weight_map"),
    (json.dumps({"weight_map": ["model-1.safetensors"]}), "has no usable weight_map"),
    (json.dumps({"weight_map": {}}), "has no usable weight_map"),
    (json.dumps({"weight_map": {"w": "model-1.safetensors", "b": "model-2.safetensors"}}),
     "names shards that are missing: model-2.safetensors"),
])
def test_a_damaged_index_is_one_line(tmp_path, index, problem):
    safetensors_file(tmp_path / "model-1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    for reader in (open_checkpoint, check_model_files):
        one_line(lambda: reader(str(tmp_path)), f"{tmp_path / 'model.safetensors.index.json'} {problem}",
                 "re-save the model")


# -- 2. a model file or mask file cut short, or with a damaged header ---------------------------

def test_a_model_file_cut_short_is_refused_at_open_with_the_sizes(tmp_path):
    data = safetensors_file(tmp_path / "full.safetensors")
    header_end = 8 + int.from_bytes(data[:8], "little")
    cases = {5: "shorter than a safetensors header",
             header_end - 10: f"its header alone needs {header_end:,} bytes, the file has {header_end - 10:,}",
             len(data) - 8: f"its header describes {len(data):,} bytes, the file has {len(data) - 8:,}"}
    for cut, detail in cases.items():
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data[:cut])
        for reader in (open_checkpoint, check_model_files):
            one_line(lambda: reader(str(folder)), f"{folder / 'model.safetensors'} is truncated", detail,
                     "re-save or re-download it")


def test_a_damaged_header_is_named(tmp_path):
    data = safetensors_file(tmp_path / "full.safetensors")
    header_end = 8 + int.from_bytes(data[:8], "little")
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"#" * (header_end - 8) + data[header_end:])
    one_line(lambda: open_checkpoint(str(tmp_path)), "has a damaged header", "re-save or re-download it")


def test_the_header_offsets_are_the_tensors_bytes(tmp_path):
    data = safetensors_file(tmp_path / "m.safetensors")
    offsets = read_safetensors_offsets(tmp_path / "m.safetensors")
    start, end = offsets["w"]
    assert end - start == 4000 and max(e for _, e in offsets.values()) == len(data)
    assert torch.equal(torch.frombuffer(bytearray(data[start:end]), dtype=torch.float32), torch.arange(1000.0))


@pytest.fixture
def mask_bytes(tmp_path) -> bytes:
    masks = {"a.weight": torch.rand(40, 30, generator=torch.Generator().manual_seed(0)) > 0.5,
             "b.bias": torch.ones(7) > 0}
    return save_masks(tmp_path / "whole.safetensors", MaskSet(masks, {"method": "test"}, "f")).read_bytes()


@pytest.mark.parametrize("keep", [0, 6, 40, -1])
def test_a_mask_file_cut_short_is_one_line(tmp_path, mask_bytes, keep):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(mask_bytes[:keep])
    one_line(lambda: load_masks(path), f"{path} is truncated", "make it again with compute_masks.py")


def test_a_mask_whose_bits_do_not_fit_its_shape_is_one_line(tmp_path):
    meta = {"format": "subnetscope-mask/1", "shapes": json.dumps({"w": [4, 5]}), "settings": "{}", "fingerprint": ""}
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, str(tmp_path / "short.safetensors"), metadata=meta)
    one_line(lambda: load_masks(tmp_path / "short.safetensors"), "mask 'w' of shape [4, 5] is stored as [2]")
    save_file({"v": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / "other.safetensors"), metadata=meta)
    one_line(lambda: load_masks(tmp_path / "other.safetensors"), "mask 'w' of shape [4, 5] is missing")
    save_file({"w": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / "nometa.safetensors"),
              metadata={"format": "subnetscope-mask/1"})
    one_line(lambda: load_masks(tmp_path / "nometa.safetensors"), "damaged metadata", "compute_masks.py")


# -- 3. a step folder without its weights -------------------------------------------------------

def test_a_step_folder_without_weights_says_so(tmp_path):
    step = tmp_path / "run" / "step_20"
    step.mkdir(parents=True)
    save_file({"first_changed::w": torch.zeros(3)}, str(step / "tracker.safetensors"))
    torch.save({"step": 20}, step / "trainer_state.pt")
    one_line(lambda: open_checkpoint(str(step)), f"{step} is a step checkpoint whose weights are missing",
             COMPACT_FILE, "trainer_state.pt, tracker.safetensors", "delete that step folder")


def test_a_compact_checkpoint_cut_short_names_the_step(tmp_path):
    save_state(tmp_path / "run" / "base", {"w": torch.randn(50, 40)})
    tuned = torch.randn(50, 40)
    atomic_save_dir(tmp_path / "run" / "step_5",
                    lambda tmp: save_compact(tmp / COMPACT_FILE, 5, "../base", {"w": (tuned, tuned != 0)}))
    path = tmp_path / "run" / "step_5" / COMPACT_FILE
    path.write_bytes(path.read_bytes()[:-100])
    one_line(lambda: open_checkpoint(str(path.parent)), f"{path} is truncated", "delete that step folder")


# -- 5. torch .bin files the weights-only reader cannot take ------------------------------------

def test_a_bin_with_a_pickled_object_is_one_line_with_the_way_out(tmp_path):
    torch.save({"w": torch.zeros(2), "extra": Custom()}, tmp_path / "pytorch_model.bin")
    for reader in (open_checkpoint, check_model_files):
        one_line(lambda: reader(str(tmp_path)),
                 f"{tmp_path / 'pytorch_model.bin'} holds pickled objects beyond tensors",
                 f"{__name__}.Custom", "only with weights_only=True", "weights_only=False", "save_file")


def test_a_legacy_bin_names_its_format_and_the_conversion_works(tmp_path):
    state = {"w": torch.randn(3, 4)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    one_line(lambda: open_checkpoint(str(tmp_path)), "legacy (pre-1.6, non-zip) torch serialization",
             "torch.save(torch.load(p, weights_only=True), p)")
    check_model_files(str(tmp_path))  # from_pretrained reads legacy files itself
    torch.save(torch.load(path, weights_only=True), path)  # the conversion the message names
    assert torch.equal(open_checkpoint(str(tmp_path)).get("w"), state["w"])


def test_a_bin_cut_short_or_not_a_state_dict_is_one_line(tmp_path):
    torch.save({"w": torch.randn(100)}, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    one_line(lambda: open_checkpoint(str(tmp_path / "cut.bin")), "is not a PyTorch checkpoint", "truncated or corrupt")
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    one_line(lambda: open_checkpoint(str(tmp_path / "list.bin")), "holds a list, not a state dict")


# -- 4. --dataset / --calib_data files ----------------------------------------------------------

GOOD = "".join(json.dumps({"text": f"review number {i}", "label": i % 2}) + "\n" for i in range(30))


def write_case(folder: Path, case: str) -> Path:
    """One damaged data file of each kind."""
    if case == "bad_line":
        lines = GOOD.splitlines()
        lines[16] = '{"text": "unterminated'
        path, body = folder / "bad.jsonl", "\n".join(lines) + "\n"
    elif case == "empty":
        path, body = folder / "empty.jsonl", ""
    elif case == "blank":
        path, body = folder / "blank.jsonl", "\n  \n\n"
    elif case == "scalar":
        path, body = folder / "scalar.json", "42"
    elif case == "truncated_gz":
        packed = gzip.compress(GOOD.encode() * 20)
        path = folder / "cut.jsonl.gz"
        path.write_bytes(packed[: len(packed) // 2])
        return path
    elif case == "binary":
        path = folder / "binary.jsonl"
        path.write_bytes(b'{"text": "ok"}\n' + bytes(range(256)))
        return path
    elif case in ("no_field_json", "no_field_csv"):
        path = folder / ("fields.jsonl" if case == "no_field_json" else "fields.csv")
        body = ('{"body": "x", "stars": 3}\n' * 3) if case == "no_field_json" else "body,stars\nx,3\ny,4\n"
    path.write_text(body)
    return path


DATA_CASES = {
    "bad_line": "line 17 is not valid JSON (Unterminated string",
    "empty": "is empty",
    "blank": "holds only blank lines",
    "scalar": "its JSON is not records (neither objects nor a list of objects)",
    "truncated_gz": "is a truncated .gz",
    "binary": "is not UTF-8 text (byte 0x80 at offset 143",
    "no_field_json": "has no text field: expected one of prompt, text, review, query, content (found body, stars)",
    "no_field_csv": "has no text field: expected one of prompt, text, review, query, content (found body, stars)",
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_a_bad_data_file_is_one_line_naming_it(tmp_path, case):
    path = write_case(tmp_path, case)
    one_line(lambda: load_task_texts(str(path)), str(path), DATA_CASES[case])
    one_line(lambda: load_prompts(str(path), word_tokenizer(), 8), str(path), DATA_CASES[case])


def test_labelled_reviews_name_a_bad_line_too(tmp_path):
    path = write_case(tmp_path, "bad_line")
    one_line(lambda: load_labelled_reviews(str(path), seed=0), f"{path}: line 17 is not valid JSON")


def test_a_good_file_still_loads_after_the_checks(tmp_path):
    path = tmp_path / "good.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD.encode()))
    assert sorted(load_task_texts(str(path))) == sorted(f"review number {i}" for i in range(30))
    texts, labels = load_labelled_reviews(str(path), seed=0)
    assert sorted(zip(texts, labels)) == sorted((f"review number {i}", i % 2) for i in range(30))


# -- the command lines: exit 2, one `error:` line, nothing written ------------------------------

def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and all(n in lines[0] for n in needles), result.stderr


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    tiny_model("gpt2", vocab_size=64, n_layer=2).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.slow
def test_compute_masks_refuses_a_truncated_model(tmp_path, tiny_folder):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    result = run_script("compute_masks.py", "--policy", tiny_folder, "--output_dir", tmp_path / "out",
                        "--sparsity", "0.5", "--no-plot")
    assert_one_error_line(result, f"{weights} is truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compute_masks_names_the_bad_line_of_its_calibration_data(tmp_path):
    data = write_case(tmp_path, "bad_line")
    result = run_script("compute_masks.py", "--policy", "tiny-gpt2", "--importance", "gradient", "--calib_data",
                        data, "--output_dir", tmp_path / "out", "--sparsity", "0.5", "--no-plot")
    assert_one_error_line(result, f"{data}: line 17 is not valid JSON")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_check_mask_refuses_a_truncated_mask_and_a_truncated_checkpoint(tmp_path, tiny_folder, mask_bytes):
    report = tmp_path / "report.json"
    mask = tmp_path / "cut_mask.safetensors"
    mask.write_bytes(mask_bytes[:-5])
    result = run_script("check_mask.py", "--checkpoint", tiny_folder, "--mask_path", mask, "--output", report)
    assert_one_error_line(result, f"{mask} is truncated", "compute_masks.py")
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    result = run_script("check_mask.py", "--checkpoint", tiny_folder,
                        "--mask_path", tmp_path / "whole.safetensors", "--output", report)
    assert_one_error_line(result, f"{weights} is truncated")
    assert not report.exists()


@pytest.mark.slow
def test_analyze_refuses_a_step_without_weights_and_a_pickled_bin(tmp_path, tiny_folder):
    run = tmp_path / "run"
    state = {"w": torch.randn(6, 5)}
    save_state(run / "base", state)
    save_state(run / "step_10", state)
    (run / "step_20").mkdir()
    torch.save({"step": 20}, run / "step_20" / "trainer_state.pt")
    out = tmp_path / "out"
    torch.save({"w": state["w"], "extra": Custom()}, tmp_path / "tuned.bin")
    no_weights, pickled = at_once(
        lambda: run_script("analyze_sparse_subnetwork.py", "--ckpt_dir", run, "--output_dir", out, "--device", "cpu"),
        lambda: run_script("analyze_sparse_subnetwork.py", "--base", run / "base", "--tuned", tmp_path / "tuned.bin",
                           "--output_dir", out, "--device", "cpu"))
    assert_one_error_line(no_weights, f"{run / 'step_20'} is a step checkpoint whose weights are missing")
    assert_one_error_line(pickled, "tuned.bin holds pickled objects beyond tensors", "weights_only=False")
    assert not out.exists()
