"""Towers, blocks, module types and attention heads of every family the research plan names, on tiny
configs built with transformers (random weights, no network): GPT-2, Pythia (GPT-NeoX), Llama, Gemma-3
(with its vision tower) and Gemma-3n (text model, audio tower; its timm vision tower by name)."""
import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3nAudioConfig,
    Gemma3nForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
)
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

from subnetscope.models import tiny_gemma3n_config, tiny_model
from subnetscope.naming import block_index, head_units, module_type, tower

LAYERS = 2


def tiny_gemma3_multimodal() -> torch.nn.Module:
    text = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                       mm_tokens_per_image=4))


def gemma3n_multimodal_names() -> list[str]:
    """Gemma3nForConditionalGeneration's parameter names: the text model under model.language_model, the audio
    tower built here, and the vision tower (timm's MobileNetV5, not installed here) by its real names."""
    torch.manual_seed(0)
    text = [n.replace("model.", "model.language_model.", 1)
            for n, _ in Gemma3nForCausalLM(tiny_gemma3n_config(vocab_size=64, num_layers=LAYERS)).named_parameters()
            if n.startswith("model.")]
    audio = Gemma3nAudioEncoder(Gemma3nAudioConfig(hidden_size=16, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                                                   input_feat_size=16, sscp_conv_channel_size=[4, 4], vocab_size=8))
    vision = ["model.vision_tower.timm_model.conv_stem.conv.weight",
              "model.vision_tower.timm_model.blocks.0.0.conv_exp.weight",
              "model.vision_tower.timm_model.blocks.1.0.attn.query.proj.weight",
              "model.vision_tower.timm_model.msfa.ffn.pw_exp.conv.weight",
              "model.embed_vision.embedding.weight", "model.embed_vision.embedding_projection.weight",
              "model.embed_audio.embedding_projection.weight"]
    return text + [f"model.audio_tower.{n}" for n, _ in audio.named_parameters()] + vision


def family_names() -> dict[str, list[str]]:
    torch.manual_seed(0)
    pythia = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                              num_hidden_layers=LAYERS, intermediate_size=64))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2))
    gemma3 = tiny_gemma3_multimodal()
    saved_gemma3 = ["language_model.model.layers.0.self_attn.q_proj.weight",  # the names save_pretrained writes
                    "vision_tower.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.mm_input_projection_weight"]
    return {
        "gpt2": [n for n, _ in tiny_model("gpt2", vocab_size=64, n_layer=LAYERS).named_parameters()],
        "pythia": [n for n, _ in pythia.named_parameters()] + ["embed_out.weight"],  # the Hub checkpoints' head
        "llama": [n for n, _ in llama.named_parameters()],
        "gemma3": [n for n, _ in gemma3.named_parameters()] + saved_gemma3,
        "gemma3n": gemma3n_multimodal_names(),
    }


# Hand-written: the module type of each family's named weights (block 1 where they sit in a block).
EXPECTED = {
    "gpt2": {"transformer.h.1.attn.c_attn.weight": "attn.qkv", "transformer.h.1.attn.c_proj.weight": "attn.o",
             "transformer.h.1.mlp.c_fc.weight": "mlp.up", "transformer.h.1.mlp.c_proj.weight": "mlp.down",
             "transformer.h.1.ln_1.weight": "norm", "transformer.wte.weight": "embedding",
             "transformer.wpe.weight": "embedding", "transformer.ln_f.weight": "norm"},
    "pythia": {"gpt_neox.layers.1.attention.query_key_value.weight": "attn.qkv",
               "gpt_neox.layers.1.attention.dense.weight": "attn.o",
               "gpt_neox.layers.1.mlp.dense_h_to_4h.weight": "mlp.up",
               "gpt_neox.layers.1.mlp.dense_4h_to_h.weight": "mlp.down",
               "gpt_neox.layers.1.input_layernorm.weight": "norm",
               "gpt_neox.layers.1.post_attention_layernorm.bias": "norm",
               "gpt_neox.embed_in.weight": "embedding", "gpt_neox.final_layer_norm.weight": "norm",
               "lm_head.weight": "lm_head", "embed_out.weight": "lm_head"},
    "llama": {"model.layers.1.self_attn.q_proj.weight": "attn.q", "model.layers.1.self_attn.k_proj.weight": "attn.k",
              "model.layers.1.self_attn.v_proj.weight": "attn.v", "model.layers.1.self_attn.o_proj.weight": "attn.o",
              "model.layers.1.mlp.gate_proj.weight": "mlp.gate", "model.layers.1.mlp.up_proj.weight": "mlp.up",
              "model.layers.1.mlp.down_proj.weight": "mlp.down", "model.embed_tokens.weight": "embedding",
              "lm_head.weight": "lm_head"},
    "gemma3": {"model.language_model.layers.1.self_attn.q_proj.weight": "attn.q",
               "model.language_model.layers.1.self_attn.q_norm.weight": "norm",
               "model.language_model.layers.1.mlp.down_proj.weight": "mlp.down",
               "model.language_model.layers.1.pre_feedforward_layernorm.weight": "norm",
               "model.vision_tower.encoder.layers.1.self_attn.q_proj.weight": "vision",
               "model.vision_tower.encoder.layers.1.mlp.fc1.weight": "vision",
               "model.vision_tower.embeddings.patch_embedding.weight": "vision",
               "model.multi_modal_projector.mm_input_projection_weight": "vision",
               "language_model.model.layers.0.self_attn.q_proj.weight": "attn.q",
               "vision_tower.encoder.layers.0.mlp.fc1.weight": "vision",
               "multi_modal_projector.mm_input_projection_weight": "vision"},
    "gemma3n": {"model.language_model.layers.1.self_attn.q_proj.weight": "attn.q",
                "model.language_model.layers.1.laurel.linear_left.weight": "laurel",
                "model.language_model.layers.1.altup.prediction_coefs.weight": "altup",
                "model.language_model.layers.1.per_layer_input_gate.weight": "per_layer_embedding",
                "model.language_model.embed_tokens.weight": "embedding",
                "model.audio_tower.conformer.0.attention.attn.q_proj.weight": "audio",
                "model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1.weight": "audio",
                "model.vision_tower.timm_model.blocks.1.0.attn.query.proj.weight": "vision",
                "model.embed_vision.embedding.weight": "vision",
                "model.embed_audio.embedding_projection.weight": "audio"},
}


@pytest.fixture(scope="module")
def names():
    return family_names()


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_maps_to_its_module_types(names, family):
    for name, kind in EXPECTED[family].items():
        assert name in names[family], name  # the table names real parameters of the tiny model
        assert module_type(name) == kind, name


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_no_text_weight_is_other_and_blocks_are_the_text_layers(names, family):
    text = [n for n in names[family] if tower(n) == "text"]
    assert [n for n in text if module_type(n) == "other"] == []
    blocks = {block_index(n) for n in text} - {None}
    assert blocks == set(range(LAYERS))
    for n in names[family]:
        if tower(n) != "text":  # a vision or audio layer is never a text block
            assert block_index(n) is None and module_type(n) == tower(n), n


def test_towers_of_multimodal_checkpoints(names):
    gemma3 = {tower(n) for n in names["gemma3"]}
    gemma3n = {tower(n) for n in names["gemma3n"]}
    assert gemma3 == {"text", "vision"} and gemma3n == {"text", "vision", "audio"}
    for family in ("gpt2", "pythia", "llama"):
        assert {tower(n) for n in names[family]} == {"text"}


def test_head_units_by_hand():
    """Each layout's head of every position, written out for tiny sizes."""
    # GPT-2 c_attn, Conv1D [d=8, 24], head_dim 4: q | k | v columns, each two heads of 4
    axis, units = head_units("transformer.h.0.attn.c_attn.weight", (8, 24), 4)
    assert axis == 1 and units.tolist() == ([0] * 4 + [1] * 4) * 3
    # GPT-2 attn.c_proj, Conv1D [in=8, out=8]: the input rows are the heads
    axis, units = head_units("transformer.h.0.attn.c_proj.weight", (8, 8), 4)
    assert axis == 0 and units.tolist() == [0] * 4 + [1] * 4
    # GPT-NeoX query_key_value, Linear [3d=24, d=8]: head h holds rows 12h .. 12h+11 (its q, k, v)
    axis, units = head_units("gpt_neox.layers.0.attention.query_key_value.weight", (24, 8), 4)
    assert axis == 0 and units.tolist() == [0] * 12 + [1] * 12
    axis, units = head_units("gpt_neox.layers.0.attention.dense.weight", (8, 8), 4)
    assert axis == 1 and units.tolist() == [0] * 4 + [1] * 4
    # Llama: k_proj of 2 KV heads [8, 32] by rows; o_proj [32, 16] by columns
    axis, units = head_units("model.layers.0.self_attn.k_proj.weight", (8, 32), 4)
    assert axis == 0 and units.tolist() == [0] * 4 + [1] * 4
    axis, units = head_units("model.layers.0.self_attn.o_proj.weight", (32, 16), 4)
    assert axis == 1 and units.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert head_units("model.layers.0.mlp.up_proj.weight", (8, 8), 4) is None
    assert head_units("model.layers.0.self_attn.q_proj.weight", (10, 8), 4) is None  # 10 rows are no 4-wide heads
    assert head_units("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", (8, 8), 4) is None


def test_neox_head_units_follow_the_model_split():
    """Independently of the hand table: perturb the query_key_value rows head_units gives head 1, and only
    head 1's query, key and value (the model's own view(heads, 3·head_dim) split) change."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                           intermediate_size=64)
    layer = GPTNeoXForCausalLM(config).gpt_neox.layers[0].attention
    weight = layer.query_key_value.weight
    axis, units = head_units("gpt_neox.layers.0.attention.query_key_value.weight", tuple(weight.shape), 8)
    x = torch.randn(3, 32)
    before = layer.query_key_value(x).view(3, 4, 24)
    with torch.no_grad():
        weight[units == 1] += 1.0
    after = layer.query_key_value(x).view(3, 4, 24)
    changed_heads = (after != before).any(dim=2).any(dim=0)
    assert axis == 0 and changed_heads.tolist() == [False, True, False, False]


def test_analysis_reports_the_vision_tower_beside_the_text_model(tmp_path):
    """A Gemma-3 multimodal checkpoint with planted changes in both towers: every text number (blocks,
    modules, the text tower's fraction) has the text model's weights alone as its denominator."""
    from subnetscope.checkpoint import open_checkpoint
    from subnetscope.engine import analyze_pair, iter_block_table
    from subnetscope.report import format_pair_table, module_rows, pair_summary

    from .conftest import plant, save_state

    torch.manual_seed(0)
    model = tiny_gemma3_multimodal()
    model.save_pretrained(tmp_path / "base")
    base = open_checkpoint(str(tmp_path / "base"))
    state = {n: base.get(n).clone() for n in base.names()}
    counts = {"language_model.model.layers.1.mlp.up_proj.weight": 40,
              "vision_tower.encoder.layers.1.mlp.fc1.weight": 100,
              "vision_tower.encoder.layers.0.self_attn.q_proj.weight": 7}
    save_state(tmp_path / "tuned", plant(state, counts))
    pair = analyze_pair(base, open_checkpoint(str(tmp_path / "tuned")), progress=False)
    text_numel = sum(v.numel() for n, v in state.items() if tower(n) == "text")
    vision_numel = sum(v.numel() for n, v in state.items() if tower(n) == "vision")
    towers = pair_summary(pair, 3)["by_tower"]
    assert list(towers) == ["text", "vision"]
    assert towers["text"]["numel"] == text_numel and towers["vision"]["numel"] == vision_numel
    assert towers["text"]["fraction_changed"]["exact"] == pytest.approx(40 / text_numel)
    assert towers["vision"]["fraction_changed"]["exact"] == pytest.approx(107 / vision_numel)
    blocks = list(iter_block_table(pair))
    assert sum(row["numel"] for row in blocks) == text_numel  # no vision layer in any block, nor in `outside`
    assert [row["exact"] for row in blocks if row["block"] != "outside"] == [0, 40]
    modules = {row["module"]: row for row in module_rows(pair)}
    assert modules["vision"]["exact"] == 107 and modules["attn.q"]["exact"] == 0
    assert "vision tower" in format_pair_table(pair, "exact", 3)
