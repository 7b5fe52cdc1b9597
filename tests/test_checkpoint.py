"""The one checkpoint reader: every format it accepts and every way a checkpoint can be bad."""
import json

import pytest
import torch
from safetensors.torch import save_file

from subnetscope.checkpoint import (
    COMPACT_FILE,
    CompactSource,
    atomic_save_dir,
    find_step_checkpoints,
    open_checkpoint,
    pack_bits,
    save_compact,
    unpack_bits,
)
from subnetscope.errors import SubnetscopeError
from subnetscope.models import tiny_model

from .conftest import TINY_GPT2_DIR, requires_shared, save_state


def test_sharded_safetensors_reads_every_tensor(tiny_gpt2_pair):
    base, _, _, state = tiny_gpt2_pair
    assert (base / "model.safetensors.index.json").exists()
    src = open_checkpoint(str(base))
    assert set(src.names()) == set(state)
    for name, value in state.items():
        assert torch.equal(src.get(name), value)
        assert src.dtype(name) == torch.bfloat16 and src.shape(name) == tuple(value.shape)


def test_scratch_reads_equal_mapped_reads(tiny_gpt2_pair):
    from subnetscope.checkpoint import ScratchBuffer

    base, _, _, state = tiny_gpt2_pair
    src, scratch = open_checkpoint(str(base)), ScratchBuffer()
    for name in state:
        got = src.get(name, scratch)
        assert got.dtype == torch.bfloat16 and torch.equal(got, src.get(name))
        assert got.data_ptr() == scratch.take(1).data_ptr()  # filled the reusable buffer


def test_pytorch_bin_fallback(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    src = open_checkpoint(str(tmp_path))
    assert sorted(src.names()) == ["a.weight", "b.bias"]
    assert torch.equal(src.get("a.weight"), state["a.weight"])


def test_gemma3n_multimodal_prefix_is_canonical(tmp_path):
    model = tiny_model("gemma3n", vocab_size=64)
    plain = {k: v.detach() for k, v in model.state_dict().items()}
    multimodal = {k.replace("model.", "model.language_model.", 1): v for k, v in plain.items()
                  if k.startswith("model.")}
    multimodal["model.vision_tower.stub.weight"] = torch.zeros(2)
    src = open_checkpoint(str(save_state(tmp_path / "mm", multimodal)))
    assert "model.layers.0.mlp.gate_proj.weight" in src.names()
    assert "model.vision_tower.stub.weight" in src.names()
    laurel = "model.layers.0.laurel.linear_left.weight"
    assert torch.equal(src.get(laurel), plain[laurel])


@requires_shared(TINY_GPT2_DIR)
def test_reads_the_real_tiny_gpt2_checkpoint():
    src = open_checkpoint(str(TINY_GPT2_DIR))
    assert src.shape("transformer.wte.weight") == (50257, 2)
    assert src.get("transformer.h.1.mlp.c_fc.weight").shape == (2, 8)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_bits_roundtrip_and_size(n):
    mask = torch.rand(n) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)


def test_pack_bits_layout_is_numpy_packbits():
    import numpy as np

    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == np.packbits(mask.numpy()).tolist()


def test_compact_checkpoint_roundtrip_is_exact(tmp_path):
    base_state = {"w": torch.randn(6, 5, dtype=torch.float32).to(torch.bfloat16), "b": torch.randn(5)}
    save_state(tmp_path / "run" / "base", base_state)
    tuned = {k: v.clone() for k, v in base_state.items()}
    tuned["w"][2, 3] += 1.0
    tuned["b"][0] = float("nan")
    masks = {k: (tuned[k].view(torch.int16 if v.dtype == torch.bfloat16 else torch.int32)
                 != v.view(torch.int16 if v.dtype == torch.bfloat16 else torch.int32)) for k, v in base_state.items()}
    atomic_save_dir(tmp_path / "run" / "step_5",
                    lambda tmp: save_compact(tmp / COMPACT_FILE, 5, "../base",
                                             {k: (tuned[k], masks[k]) for k in tuned}))
    src = open_checkpoint(str(tmp_path / "run" / "step_5"))
    assert isinstance(src, CompactSource) and src.step == 5
    for k in tuned:
        assert torch.equal(src.get(k).view(torch.uint8), tuned[k].view(torch.uint8))
    assert src.changed_mask("w").sum() == 1
    assert not list((tmp_path / "run").glob(".step_5*"))  # no temporary folder left behind


def test_step_folders_sort_numerically_and_filter(tmp_path):
    for name in ("step_100", "step_20", "checkpoint-40", "step_5", "notes", "step_x"):
        (tmp_path / name).mkdir()
    assert [c.step for c in find_step_checkpoints(str(tmp_path))] == [5, 20, 40, 100]
    assert [c.step for c in find_step_checkpoints(str(tmp_path), max_step=40, step_interval=20)] == [20, 40]
    with pytest.raises(SubnetscopeError, match="no step checkpoints"):
        find_step_checkpoints(str(tmp_path), max_step=1)


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(SubnetscopeError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubnetscopeError, match="empty"):
        open_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(SubnetscopeError, match="has no weights"):
        open_checkpoint(str(tmp_path / "noweights"))
    save_file({"w": torch.randn(1000)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SubnetscopeError, match=f"is truncated: its header describes {len(data):,} bytes, the file has "
                                                f"{len(data) // 2:,}"):
        open_checkpoint(str(tmp_path / "trunc"))
    (tmp_path / "sharded").mkdir()
    index = json.dumps({"weight_map": {"w": "model-1.safetensors"}})
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(SubnetscopeError, match="missing: model-1.safetensors"):
        open_checkpoint(str(tmp_path / "sharded"))


def test_hub_id_offline_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SubnetscopeError, match="pass a local model folder"):
        open_checkpoint("some-org/some-model-that-is-not-here")
