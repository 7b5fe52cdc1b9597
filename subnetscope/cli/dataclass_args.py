"""Every field of a config dataclass as a flag and a YAML key: dataclass defaults, then the YAML
file, then the flags given (the pattern of TRL's config dataclasses, without HfArgumentParser's
extra types)."""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from ..errors import SubnetscopeError

RUN_FLAGS_HELP = {
    "resume": "continue the run in --output_dir from its newest checkpoint",
    "wandb": "also log to this Weights & Biases project",
    "no_tqdm": "no progress bar",
}


def _field_type(cls: type, name: str) -> type:
    kind = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, help_texts: dict[str, str],
                        choices: dict[str, tuple] | None = None) -> None:
    """One flag per field, default None so that the YAML file and the defaults can tell it was not given."""
    p.add_argument("--config", help="YAML file of settings; flags override it")
    for f in fields(cls):
        kind = _field_type(cls, f.name)
        if kind is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_texts[f.name])
        else:
            p.add_argument(f"--{f.name}", type=kind, default=None, help=help_texts[f.name],
                           choices=(choices or {}).get(f.name))


def load_yaml_config(cls: type, path: str) -> dict:
    """The YAML mapping, every key checked against `cls` and converted to its type."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SubnetscopeError(f"--config {path} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise SubnetscopeError(f"{path}: must be a mapping of setting: value")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SubnetscopeError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    values = {}
    for key, value in data.items():
        kind = _field_type(cls, key)
        if value is None:
            values[key] = None
        elif kind is bool and not isinstance(value, bool):
            raise SubnetscopeError(f"{path}: {key}: {value!r} is not true or false")
        else:
            try:
                values[key] = kind(value)
            except (TypeError, ValueError):
                raise SubnetscopeError(f"{path}: {key}: {value!r} is not a {kind.__name__}") from None
    return values


def config_from_args(cls: type, args: argparse.Namespace):
    values = load_yaml_config(cls, args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None})
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    return cls(**{**defaults, **values})
