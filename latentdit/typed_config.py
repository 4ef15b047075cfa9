"""Typed YAML configs: dataclasses built from nested dicts, ``section.field=value`` overrides, saving.

A config is a dataclass with a ``name`` field and one dataclass per section (a *schema*: the DiT run's
in :mod:`latentdit.config`, VAE training's in :mod:`latentdit.vae.config`). :func:`load` reads a YAML
file (or starts from the defaults), applies overrides (values parsed with ``yaml.safe_load`` and checked
against the field's declared type) and builds the dataclasses; :func:`to_yaml` writes one back. Unknown sections or fields, ill-typed
values and unreadable files raise :class:`LatentDiTError` naming the file and field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from latentdit.errors import LatentDiTError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# type checking of single values
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` when that is lossless and unambiguous, else raise."""

    def bad() -> LatentDiTError:
        return LatentDiTError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except LatentDiTError:
                pass
        raise bad()
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(cls: type, values: Any, source: str, section: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise LatentDiTError(f"{source}: section '{section}' must be a mapping of field: value, "
                             f"got {type(values).__name__}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise LatentDiTError(f"{source}: unknown field '{section}.{key}'; valid fields of '{section}': "
                                 f"{', '.join(sorted(hints))}")
        kwargs[key] = _coerce(value, hints[key], f"{source}: field '{section}.{key}'")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def config_from_dict(cls: type[T], table: dict[str, type], data: Any, source: str = "config") -> T:
    """``cls(name=..., **sections)`` from a nested dict whose sections are the dataclasses in ``table``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LatentDiTError(f"{source}: expected a mapping with sections {', '.join(table)}, "
                             f"got {type(data).__name__}")
    unknown = [k for k in data if k not in table and k != "name"]
    if unknown:
        raise LatentDiTError(f"{source}: unknown section '{unknown[0]}'; valid sections: "
                             f"{', '.join(table)} (and 'name')")
    sections = {s: _build_section(sec, data.get(s), source, s) for s, sec in table.items()}
    name = data.get("name", "")
    if not isinstance(name, str):
        raise LatentDiTError(f"{source}: field 'name': expected str, got {name!r}")
    return cls(name=name, **sections)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``section.field=value`` into (["section", "field"], "value")."""
    if "=" not in text:
        raise LatentDiTError(f"config override {text!r}: expected section.field=value, e.g. train.lr=2e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts) or len(parts) > 2:
        raise LatentDiTError(f"config override {text!r}: expected section.field=value, e.g. train.lr=2e-4")
    return parts, raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], table: dict[str, type]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to a nested dict (values parsed with ``yaml.safe_load``;
    a field declared ``str`` takes the raw text). Unknown names raise. ``table`` maps section names
    to dataclasses."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        parts, raw = parse_override(text)
        if parts == ["name"]:
            data["name"] = raw
            continue
        if len(parts) != 2:
            raise LatentDiTError(f"config override {text!r}: expected section.field=value "
                                 f"(sections: {', '.join(table)})")
        section, key = parts
        if section not in table:
            raise LatentDiTError(f"config override {text!r}: unknown section '{section}'; valid sections: "
                                 f"{', '.join(table)}")
        hints = _field_types(table[section])
        if key not in hints:
            raise LatentDiTError(f"config override {text!r}: unknown field '{section}.{key}'; valid fields "
                                 f"of '{section}': {', '.join(sorted(hints))}")
        if hints[key] is str:
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                raise LatentDiTError(f"config override {text!r}: could not parse the value: "
                                     f"{yaml_error_text(e, 'value')}") from e
            value = _coerce(value, hints[key], f"config override {text!r}: field '{section}.{key}'")
        sec = data.get(section)
        if not isinstance(sec, dict):
            sec = {}
        sec[key] = value
        data[section] = sec
    return data


def read_config_file(path: str | os.PathLike | None) -> tuple[Any, str]:
    """``(YAML data, source name)`` of a config file; ``({}, "config")`` for None. ``name`` defaults to
    the file's stem."""
    if path is None:
        return {}, "config"
    p = Path(path).expanduser()
    if not p.is_file():
        raise LatentDiTError(f"config file not found: {p}" if not p.exists() else
                             f"config file {p} is a folder; expected a YAML file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise LatentDiTError(f"config file {p} is not UTF-8 text (byte {e.start}); expected a YAML file") from e
    except yaml.YAMLError as e:
        raise LatentDiTError(f"{yaml_error_text(e, str(p))} (config file {p} is not valid YAML)") from e
    if not isinstance(data, dict):
        raise LatentDiTError(f"config file {p}: expected a mapping of sections (section: {{field: value}}) at "
                             f"the top level, got {type(data).__name__}")
    if "name" not in data:
        data["name"] = p.stem
    return data, str(p)


def yaml_error_text(e: Exception, source: str) -> str:
    """``source:line:column: problem`` (one line) for a YAML parse error; PyYAML's own text spans several lines."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} from line {context_mark.line + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: {problem}"


def load(cls: type[T], table: dict[str, type], path: str | os.PathLike | None, overrides: Sequence[str] = (),
         validate: Callable[[T, str], None] | None = None) -> T:
    """A ``cls`` from a YAML file (or the defaults when ``path`` is None) with ``overrides`` applied,
    checked by ``validate(cfg, source)`` when given. ``name`` defaults to the file's stem."""
    data, source = read_config_file(path)
    cfg = config_from_dict(cls, table, apply_overrides(data, overrides, table), source)
    if validate is not None:
        validate(cfg, source)
    return cfg


def to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML text (loadable again with :func:`load`)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def field_error(source: str, name: str, expected: str, got: Any) -> LatentDiTError:
    """The error of a value out of range: ``source: field 'section.field': expected ..., got ...``."""
    return LatentDiTError(f"{source}: field '{name}': expected {expected}, got {got!r}")
