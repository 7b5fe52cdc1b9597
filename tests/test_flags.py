"""Issue 18: one system makes the training commands' flags from their config dataclasses. Every field is a
flag whose help shows the field's actual default; YAML --config sits between the presets and the flags; the
run matrix checks its values as the flags are checked; TRL's spellings are aliases of their fields."""
import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from subnetscope.cli import grpo, ppo, prune, sft, sparse_ft, testbed
from subnetscope.cli.dataclass_args import field_meta
from subnetscope.cli.training import PRESETS, config_from_args
from subnetscope import config as configs
from subnetscope.config import BaselineConfig, GRPOConfig, PPOConfig
from subnetscope.errors import SubnetscopeError
from subnetscope.matrix import _check_value
from subnetscope.prune_trainer import PruneConfig
from subnetscope.sparse_ft import SparseFTConfig

COMMANDS = [(grpo, GRPOConfig), (ppo, PPOConfig), (sft, BaselineConfig), (prune, PruneConfig),
            (sparse_ft, SparseFTConfig)]


@pytest.mark.parametrize("module, config_cls", COMMANDS, ids=lambda x: getattr(x, "__name__", ""))
def test_every_field_is_a_flag_whose_help_shows_its_default(module, config_cls):
    actions = [a for a in module.build_parser()._actions if a.help != argparse.SUPPRESS]
    for f in dataclasses.fields(config_cls):
        helps = [a.help for a in actions if a.dest == f.name]
        assert helps, f"{f.name} has no flag"
        for text in helps:
            assert text.count("(default") == 1, text  # the generated one, none written by hand
            assert not text.startswith("(default"), f"{f.name} is not described where it is declared"
            assert text.endswith(f"(default {f.default})".replace("%", "%%")), text


def write_yaml(tmp_path, data: dict) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_sits_between_the_presets_and_the_flags(tmp_path):
    """defaults < preset < YAML < flags, each checked on a setting the next one leaves alone."""
    smoke = {**PRESETS["smoke"].values, **grpo.PRESET_EXTRA["smoke"]}
    path = write_yaml(tmp_path, {"lr": 0.5, "max_steps": smoke["max_steps"] + 4, "group_size": 3})
    args = grpo.build_parser().parse_args(["--smoke", "--config", path, "--max_steps", str(smoke["max_steps"] + 8)])
    config = grpo.grpo_config(args)
    assert config.max_steps == smoke["max_steps"] + 8  # flag over YAML over preset
    assert (config.lr, config.group_size) == (0.5, 3)  # YAML over default, and over the preset's group size
    assert config.policy == smoke["policy"]  # the preset over the default
    assert config.beta == GRPOConfig().beta  # the default where nothing else speaks
    path = write_yaml(tmp_path, {"lr": 0.5, "max_steps": 7})
    sft_config = sft.config_from_args(sft.build_parser().parse_args(["--config", path, "--lr", "0.25"]))
    assert (sft_config.lr, sft_config.max_steps) == (0.25, 7)


@pytest.mark.parametrize("module", [grpo, ppo, sft])
def test_an_unknown_yaml_key_is_one_line(tmp_path, capsys, module):
    path = write_yaml(tmp_path, {"lr": 0.1, "learning_rat": 0.1})
    with pytest.raises(SystemExit) as done:
        module.main(["--config", path])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert done.value.code == 2 and len(lines) == 1, lines
    assert "unknown key(s) learning_rat" in lines[0] and "known keys: " in lines[0] and " lr," in lines[0]


@pytest.mark.parametrize("key, bad", [("optimizer", "adam"), ("batch_size", 1.5), ("precision", "half"),
                                      ("lr", "fast"), ("view_dtype", "bf16"), ("group_size", "four")])
def test_the_matrix_and_the_flags_refuse_the_same_values(tmp_path, key, bad):
    with pytest.raises(SubnetscopeError, match=key):
        _check_value("rl-grpo", key, bad, GRPOConfig)
    with pytest.raises(SystemExit):
        grpo.build_parser().parse_args([f"--{key}", str(bad)])
    with pytest.raises(SubnetscopeError, match=key):
        grpo.grpo_config(grpo.build_parser().parse_args(["--config", write_yaml(tmp_path, {key: bad})]))


@pytest.mark.parametrize("key, good", [("lr", "1e-3"), ("batch_size", 4), ("optimizer", "sgd"),
                                       ("target_kl", None), ("whiten_advantages", False)])
def test_the_matrix_and_the_yaml_file_read_a_good_value_as_the_flag_does(tmp_path, key, good):
    from_matrix = _check_value("rl-ppo", key, good, PPOConfig)
    path = write_yaml(tmp_path, {key: good})
    from_yaml = config_from_args(PPOConfig, ppo.build_parser().parse_args(["--config", path]))
    meta = field_meta(PPOConfig, key)
    if isinstance(good, bool) or good is None:
        switch = next(flag for flag, value in meta["switches"].items() if value is good)
        flags = [f"--{switch}"]
    else:
        flags = [f"--{key}", str(good)]
    from_flag = config_from_args(PPOConfig, ppo.build_parser().parse_args(flags))
    assert from_matrix == getattr(from_yaml, key) == getattr(from_flag, key)


@pytest.mark.parametrize("module, config_cls", COMMANDS[:3], ids=lambda x: getattr(x, "__name__", ""))
def test_aliases_set_their_field(module, config_cls):
    aliased = {f.name: field_meta(config_cls, f.name)["aliases"] for f in dataclasses.fields(config_cls)
               if "aliases" in field_meta(config_cls, f.name)}
    assert aliased
    parse = module.build_parser().parse_args
    for name, aliases in aliased.items():
        value = str(getattr(config_cls(), name) * 3)
        for alias in aliases:
            assert getattr(parse([f"--{alias}", value]), name) == getattr(parse([f"--{name}", value]), name)
            with pytest.raises(SubnetscopeError, match="name one setting"):
                parse([f"--{alias}", value, f"--{name}", str(getattr(config_cls(), name))])


@pytest.mark.parametrize("name, settings_of", [
    ("grpo_gpt2m_imdb", lambda argv: grpo.grpo_config(grpo.build_parser().parse_args(argv))),
    ("ppo_gpt2m_imdb", lambda argv: config_from_args(PPOConfig, ppo.build_parser().parse_args(argv))),
    ("sft_gpt2m_imdb", lambda argv: sft.config_from_args(sft.build_parser().parse_args(argv))),
    ("testbed_imdb", lambda argv: settings_of_testbed(["build", *argv])),
])
def test_example_configs_are_settings_of_their_command(name, settings_of):
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    written = yaml.safe_load(path.read_text())
    config = settings_of(["--config", str(path)])
    assert {key: getattr(config, key) for key in written} == written


def settings_of_testbed(argv: list[str]):
    """The settings `python testbed.py ARGV` runs with (build or study)."""
    return testbed.command_config(testbed.build_parser().parse_args(argv))


@pytest.mark.parametrize("command, config_cls", [("build", configs.TestbedConfig), ("study", configs.StudyConfig)])
def test_every_testbed_flag_is_described_where_its_field_is(command, config_cls):
    parser = testbed.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    actions = [a for a in sub._actions if a.help != argparse.SUPPRESS]
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        helps = [a.help for a in actions if a.dest == f.name]
        assert helps, f"{f.name} has no flag"
        default = getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        for text in helps:
            assert text.startswith(f.metadata["help"]) and text.count("(default") == 1, text
            assert text.endswith(f"(default {shown})"), text


def test_testbed_yaml_gives_the_config_of_the_same_flags(tmp_path):
    """build: YAML keys and flags set the same settings, over the --tiny preset; study: lists and switches too."""
    settings = {"n_layer": 3, "n_head": 3, "n_embd": 48, "lm_steps": 7, "lm_lr": 0.001, "data": "reviews.jsonl"}
    flags = [text for key, value in settings.items() for text in (f"--{key}", str(value))]
    expected = configs.TestbedConfig(**{**testbed.PRESETS["tiny"].values, **settings})
    from_yaml = settings_of_testbed(["build", "--tiny", "--config", write_yaml(tmp_path, settings)])
    assert from_yaml == settings_of_testbed(["build", "--tiny", *flags]) == expected
    assert settings_of_testbed(["build", "--config", write_yaml(tmp_path, settings), "--n_layer", "5"]).n_layer == 5
    study = {"algos": ["grpo", "sft"], "seeds": [3, 4], "subnetwork": False, "view_dtype": "float16"}
    expected = configs.StudyConfig(algos=["grpo", "sft"], seeds=[3, 4], subnetwork=False, view_dtype="float16")
    from_yaml = settings_of_testbed(["study", "--config", write_yaml(tmp_path, study)])
    from_flags = settings_of_testbed(["study", "--algos", "grpo", "sft", "--seeds", "3", "4", "--no_subnetwork",
                                 "--view_dtype", "float16"])
    assert from_yaml == from_flags == expected
    for bad in ({"algos": ["grpo", "rft"]}, {"seeds": 3}, {"seeds": [1.5]}):
        with pytest.raises(SubnetscopeError, match=next(iter(bad))):
            settings_of_testbed(["study", "--config", write_yaml(tmp_path, bad)])
