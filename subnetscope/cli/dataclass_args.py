"""The one way flags are made: every field of a config dataclass is a flag and a YAML key, described where
it is declared (TRL's config dataclasses' pattern). A field's metadata holds its `help`, and optionally
`choices`, `aliases` (other spellings, e.g. TRL's), `switches` (value-less flags that set a value, e.g.
`--no_chat_template`), `metavar` and `type` (a parser of the text given; a bool field with one takes a value,
e.g. yes/no). A list field's flag takes one or more values. Settings come from the dataclass
defaults, then the presets named, then the YAML --config, then the flags given; the values of a YAML file
and of a run matrix are checked here too (check_value)."""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from ..errors import SubnetscopeError, refuse_renamed

SPELLINGS = "_spellings"  # the namespace's record of which spelling set each field


@dataclass(frozen=True)
class Preset:
    """A named set of settings, applied before the YAML file and the flags (which win over it)."""

    help: str
    values: dict


def field_meta(cls: type, name: str) -> dict:
    """A field's metadata merged over the class hierarchy: a subclass that only changes a default keeps
    the help written where the field was first declared."""
    merged: dict = {}
    for klass in reversed(cls.__mro__):
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None:
            merged.update(declared.metadata)
    return merged


def _field_kinds(cls: type, name: str) -> tuple[type, tuple]:
    """The field's annotation and the types it allows (NoneType included for an optional one)."""
    kind = typing.get_type_hints(cls)[name]
    return kind, typing.get_args(kind) or (kind,)


def _list_item(cls: type, name: str) -> type | None:
    """The item type of a list field (a flag taking several values), else None."""
    kind = typing.get_type_hints(cls)[name]
    return typing.get_args(kind)[0] if typing.get_origin(kind) is list else None


def _base_type(cls: type, name: str) -> type:
    return next(t for t in _field_kinds(cls, name)[1] if t is not type(None))


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def _converted(value: Any, kinds: list[type], parse: Callable[[str], Any] | None, name: str) -> Any:
    """`value` as the first of `kinds` that takes it (numbers from YAML's text too: it reads 1e-3 as text);
    None when none does."""
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is bool and isinstance(value, str) and parse is not None:  # a quoted yes/no in YAML
            try:
                return parse(value)
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise SubnetscopeError(f"--{name} {value!r}: {err}") from None
        number = value
        if kind in (int, float) and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
        if kind in (int, float) and isinstance(number, (int, float)) and not isinstance(number, bool):
            if kind is int and not float(number).is_integer():
                continue
            return kind(number)
        if kind is str and isinstance(value, str):
            try:
                return parse(value) if parse else value
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise SubnetscopeError(f"--{name} {value!r}: {err}") from None
    return None


def check_value(cls: type, name: str, value: Any, context: str = "") -> Any:
    """A typed value (from YAML or a run matrix) for field `name` of `cls`, converted to the field's type and
    checked against its choices (each item of a list field's list); an error names the key and the value."""
    kind, allowed = _field_kinds(cls, name)
    meta = field_meta(cls, name)
    item = _list_item(cls, name)
    if item is not None:
        if not isinstance(value, list) or not value:
            raise SubnetscopeError(f"{name}={value!r} is not a valid value{context} (expected a list of "
                                   f"{item.__name__})")
        return [_checked_choice(meta, name, _converted(v, [item], meta.get("type"), name), v, item, context)
                for v in value]
    if value is None and type(None) in allowed:
        return None
    converted = _converted(value, [t for t in allowed if t is not type(None)], meta.get("type"), name)
    return _checked_choice(meta, name, converted, value, kind, context)


def _checked_choice(meta: dict, name: str, converted: Any, value: Any, kind: Any, context: str) -> Any:
    if converted is None:
        raise SubnetscopeError(f"{name}={value!r} is not a valid value{context} (expected {kind})")
    choices = meta.get("choices")
    if choices is not None and converted not in choices:
        raise SubnetscopeError(f"--{name} {converted!r}: use {', '.join(map(str, choices))}")
    return converted


class _Setting(argparse.Action):
    """Sets one field; two spellings of the same field with different values are refused (one setting)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        spelled = namespace.__dict__.setdefault(SPELLINGS, {})
        earlier = spelled.get(self.dest)
        if earlier is not None and earlier[0] != option_string and earlier[1] != value:
            raise SubnetscopeError(f"{earlier[0]} {earlier[1]} and {option_string} {value} name one setting: "
                                   "give one of them")
        spelled[self.dest] = (option_string, value)
        setattr(namespace, self.dest, value)


def _help(text: str, default: Any) -> str:
    shown = (" ".join(map(str, default)) if isinstance(default, list) else str(default)).replace("%", "%%")
    return f"{text} (default {shown})" if text else f"(default {shown})"


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, presets: dict[str, Preset] | None = None) -> None:
    """`--config`, one flag per field (help from the field's metadata, with the field's actual default
    appended) and one per preset. A flag not given stays absent from the namespace, so that
    presets and the YAML file can tell."""
    p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                   help="YAML file of settings, keys = the flags' names (without --); flags given win over it")
    settings = p.add_argument_group("settings (YAML keys)")
    for f in fields(cls):
        meta = field_meta(cls, f.name)
        text = meta.get("help", "")
        default, kind, item = _default(f), _base_type(cls, f.name), _list_item(cls, f.name)
        names = [f"--{n}" for n in (f.name, *meta.get("aliases", ()))]
        if item is not None:
            settings.add_argument(*names, dest=f.name, action=_Setting, nargs="+", type=meta.get("type", item),
                                  choices=meta.get("choices"), metavar=meta.get("metavar"),
                                  default=argparse.SUPPRESS, help=_help(text, default))
        elif kind is not bool or "type" in meta:  # a bool with a parser takes a value (yes/no)
            settings.add_argument(*names, dest=f.name, action=_Setting, type=meta.get("type", kind),
                                  choices=meta.get("choices"),
                                  metavar=meta.get("metavar"), default=argparse.SUPPRESS, help=_help(text, default))
        elif "switches" not in meta:
            settings.add_argument(*names, dest=f.name, action=_Setting, nargs=0, const=True,
                                  default=argparse.SUPPRESS, help=_help(text, default))
            if not f.name.startswith("no_"):
                settings.add_argument(f"--no-{f.name}", dest=f.name, action=_Setting, nargs=0, const=False,
                                      default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for flag, value in meta.get("switches", {}).items():
            settings.add_argument(f"--{flag}", dest=f.name, action=_Setting, nargs=0, const=value,
                                  default=argparse.SUPPRESS, help=_help(f"{text}; --{flag} sets {f.name} to {value}",
                                                                        default))
    if presets:
        group = p.add_argument_group("presets (flags and --config win over them)")
        for name, preset in presets.items():
            group.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=preset.help)


def load_yaml_config(cls: type, path: str) -> dict:
    """The YAML mapping, every key a field of `cls` and every value checked by check_value."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SubnetscopeError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise SubnetscopeError(f"--config {path} is not a YAML file: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SubnetscopeError(f"{path}: must be a mapping of setting: value")
    known = [f.name for f in fields(cls)]
    unknown = sorted(map(str, set(data) - set(known)))
    refuse_renamed(unknown, known, keys=True, where=f"{path}: ")
    if unknown:
        raise SubnetscopeError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return {key: check_value(cls, key, value, f" in {path}") for key, value in data.items()}


def given_settings(cls: type, args: argparse.Namespace) -> dict:
    """The settings given: the YAML --config's, then the flags' over them."""
    given = load_yaml_config(cls, args.config) if getattr(args, "config", None) else {}
    given.update({f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    return given


def config_from_args(cls: type, args: argparse.Namespace, presets: dict[str, Preset] | None = None,
                     derive: Callable[[dict, dict], dict] | None = None):
    """Dataclass defaults < the presets named < YAML --config < flags; `derive(values, given)` returns
    settings that follow from the given ones (TRL's batch size, a named reward model)."""
    values: dict = {}
    for name, preset in (presets or {}).items():
        if getattr(args, name, False):
            values.update(preset.values)
    given = given_settings(cls, args)
    if derive is not None:
        given.update(derive({**values, **given}, given))
    return cls(**{**values, **given})
