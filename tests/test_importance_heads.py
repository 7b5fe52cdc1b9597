"""Structured pruning's attention heads on GPT-2 (Conv1D c_attn: q | k | v columns), Llama (separate q, o;
shared K/V) and GPT-NeoX/Pythia (query_key_value rows head by head, each head's q, k, v together): the units
against tables written out by hand, and against what the model itself computes per head."""
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from subnetscope.errors import SubnetscopeError
from subnetscope.importance import prunable_tensors, structured_masks, unit_groups

HIDDEN, HEADS, HD = 32, 4, 8  # 4 heads of 8


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=HIDDEN, n_layer=1, n_head=HEADS))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=2,
                                            max_position_embeddings=32))
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=HEADS,
                                            max_position_embeddings=32))


def _each(*runs: tuple[int, int]) -> list[int]:
    """Head numbers written out: `runs` of (head, how many positions in a row)."""
    return [head for head, count in runs for _ in range(count)]


# name -> (axis, head of each position), by hand. The q | k | v and per-head layouts are spelled out run by run.
HAND = {
    "gpt2": {
        "transformer.h.0.attn.c_attn.weight": (1, _each(*[(h, HD) for _ in "qkv" for h in range(HEADS)])),
        "transformer.h.0.attn.c_proj.weight": (0, _each(*[(h, HD) for h in range(HEADS)])),
    },
    "llama": {
        "model.layers.0.self_attn.q_proj.weight": (0, _each(*[(h, HD) for h in range(HEADS)])),
        "model.layers.0.self_attn.o_proj.weight": (1, _each(*[(h, HD) for h in range(HEADS)])),
    },
    "neox": {
        "gpt_neox.layers.0.attention.query_key_value.weight": (0, _each(*[(h, 3 * HD) for h in range(HEADS)])),
        "gpt_neox.layers.0.attention.dense.weight": (1, _each(*[(h, HD) for h in range(HEADS)])),
    },
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_head_units_match_the_hand_tables(arch):
    model = _model(arch)
    groups = {g.label: g for g in unit_groups(model, prunable_tensors(model))}
    assert set(groups) == {"layer 0 attn", "layer 0 mlp"}
    attn = groups["layer 0 attn"]
    assert attn.n_units == HEADS
    assert {n: (axis, units.tolist()) for n, (axis, units) in attn.members.items()} == HAND[arch]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("head", [0, 2])
def test_structured_mask_drops_the_one_weak_head(arch, head):
    """The head whose hand-table positions score zero is the one pruned at 1 of 4 heads, all of it and
    nothing else in the attention weights."""
    model = _model(arch)
    tensors = prunable_tensors(model)
    scores = {n: torch.ones(t.param.shape) for n, t in tensors.items()}
    for name, (axis, units) in HAND[arch].items():
        scores[name].index_fill_(axis, torch.tensor([i for i, u in enumerate(units) if u == head]), 0.0)
    keep = structured_masks(scores, unit_groups(model, tensors), 1 / HEADS)
    for name, (axis, units) in HAND[arch].items():
        dropped = (~keep[name]).all(dim=1 - axis).nonzero().reshape(-1).tolist()
        assert dropped == [i for i, u in enumerate(units) if u == head]
        assert int((~keep[name]).sum()) == len(dropped) * keep[name].shape[1 - axis]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_masked_head_changes_only_its_own_slice_of_the_output_projection_input(arch):
    """Independently of any table: zero what the mask drops from the query (or fused q/k/v) weight and its
    bias, run the model, and the input of the output projection changes exactly in the columns (rows for
    GPT-2's Conv1D) the same mask drops there, so both describe the head the model computes."""
    model = _model(arch).eval()
    tensors = prunable_tensors(model)
    scores = {n: torch.rand(t.param.shape, generator=torch.Generator().manual_seed(1)) for n, t in tensors.items()}
    keep = structured_masks(scores, unit_groups(model, tensors), 1 / HEADS)
    (q_name, (q_axis, _)), (o_name, (o_axis, _)) = HAND[arch].items()
    modules = dict(model.named_modules())
    seen = []
    hook = modules[o_name.rsplit(".", 1)[0]].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids)
        q_module = modules[q_name.rsplit(".", 1)[0]]
        gone = (~keep[q_name]).all(dim=1 - q_axis)
        q_module.weight.mul_(keep[q_name])
        if q_module.bias is not None:
            q_module.bias[gone] = 0.0
        model(input_ids=ids)
    hook.remove()
    changed = ((seen[0] - seen[1]).abs().amax(dim=(0, 1)) > 1e-6).nonzero().reshape(-1).tolist()
    dropped_in_o = (~keep[o_name]).all(dim=1 - o_axis).nonzero().reshape(-1).tolist()
    assert len(dropped_in_o) == HD and changed == dropped_in_o


def test_heads_the_config_does_not_match_fail_loudly():
    model = _model("llama")
    model.config.num_attention_heads = 2  # q_proj still holds 4 heads of config.head_dim 8
    with pytest.raises(SubnetscopeError, match=r"q_proj.*2 heads of 8"):
        unit_groups(model, prunable_tensors(model))
