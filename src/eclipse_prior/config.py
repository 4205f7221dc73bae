"""Dataclass configuration that a YAML file and command-line flags can both override.

Precedence: dataclass defaults < YAML file < explicit flags. Every field of a config dataclass becomes a
flag (``foo_bar`` -> ``--foo-bar``); a field's ``metadata={"help": ...}`` becomes the flag's help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from eclipse_prior.errors import ConfigError

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field; defaults are None so that only explicit flags override."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        tp = _unwrap_optional(hints[field.name])
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(typing.get_args(tp)[0])
        elif origin in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(tp)[0]
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        parser.add_argument(flag, **kwargs)


def build_config(cls: type[T], args: argparse.Namespace | None = None, yaml_path: str | Path | None = None) -> T:
    """Resolve a config: defaults, then the YAML file, then flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(check_fields(cls, load_yaml_mapping(yaml_path), str(yaml_path)))
    if args is not None:
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
    return config_from_mapping(cls, values, str(yaml_path) if yaml_path is not None else "flags")


def load_yaml_mapping(yaml_path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping), or a one-line ConfigError."""
    path = Path(yaml_path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8-sig")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return loaded


def read_json_object(path: str | Path, remedy: str) -> dict[str, Any]:
    """The JSON object a model or output file holds, or a one-line ConfigError naming the file and `remedy`
    (damaged, not UTF-8, not JSON, or JSON that is not an object): every such file is read through here."""
    file = Path(path)
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file} is not UTF-8 text (byte {err.start}); {remedy}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON ({err.msg} at line {err.lineno}); {remedy}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, not {type(data).__name__}; {remedy}")
    return data


def check_fields(cls: type, values: Any, source: str) -> dict[str, Any]:
    """``values`` if it is a mapping of ``cls``'s field names, else a one-line ConfigError naming ``source``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must hold a mapping of field: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown field(s) in {source}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return values


def config_from_mapping(cls: type[T], values: Any, source: str) -> T:
    """A config of ``cls`` from defaults overridden by a mapping (a YAML section), type-checked per field."""
    hints = typing.get_type_hints(cls)
    checked = check_fields(cls, values, source)
    return cls(**{name: _check_value(name, value, hints[name]) for name, value in checked.items()})


def _check_value(name: str, value: Any, annotation: Any) -> Any:
    """Coerce a YAML/flag value to the field's type, or raise a one-line ConfigError naming the field."""
    if value is None and _unwrap_optional(annotation) is not annotation:
        return None
    tp = _unwrap_optional(annotation)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)[:1]
        items = [_check_value(name, v, item_type) for v in value]
        return items if origin is list else tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):  # nan/inf pass every later `< 0` check and poison a whole run
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, so a run records exactly what it used."""
    from eclipse_prior.outputs import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
