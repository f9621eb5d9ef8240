"""Dataclass configs from YAML/JSON files and ``key=value`` command-line overrides.

Configs are plain (possibly nested) dataclasses. A file gives any subset of the fields, of a
nested section too: that changes the fields it names of the enclosing config's own default
for the section (a compare's ``train: {steps: 100}`` keeps the compare's other training
defaults, not TrainConfig's). Overrides such as ``lr=3e-4`` or ``loss.name=gem`` are applied
on top and typed by the dataclass field they name, so ``run_dir=123`` stays a string and
``freeze=[vision.*]`` becomes a list. Every error names the file or override and the dotted
field it concerns.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file, override or spec that cannot be used as given. It names the file or
    override and the field, so the CLI reports it in one line rather than a traceback."""

__all__ = [
    "ConfigError",
    "apply_overrides",
    "changed_fields",
    "coerce_options",
    "config_from_dict",
    "config_to_dict",
    "format_spec",
    "load_config",
    "parse_overrides",
    "parse_spec",
    "require_choices",
    "save_config",
]


@dataclasses.dataclass(frozen=True)
class _Override:
    """An override value still in its command-line text, parsed once its field type is known."""

    text: str
    source: str


def load_config(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
    """Build ``cls`` from an optional YAML/JSON file, then apply ``key=value`` overrides."""
    data = _read_file(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "config"
    return config_from_dict(cls, _merge(data, parse_overrides(overrides)), source=source)


def apply_overrides(config: C, overrides: Iterable[str]) -> C:
    """A copy of ``config`` with ``key=value`` overrides applied."""
    return config_from_dict(
        type(config), _merge(config_to_dict(config), parse_overrides(overrides))
    )


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Nested dict from ``a.b=value`` strings; values stay text until their field's type is
    known."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} must look like 'key=value' or 'section.key=value'"
            )
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r} sets a field inside {part!r}, which is also set whole"
                )
            node = child
        node[leaf] = _Override(text.strip(), source=f"override {item!r}")
    return out


def config_from_dict(cls: type[C], data: Mapping[str, Any], source: str = "config") -> C:
    """Build dataclass ``cls`` from a mapping, checking names and types field by field."""
    return _build(cls, data, source, prefix="")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (lists, not tuples) suitable for YAML/JSON."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write ``config`` as JSON (``.json``) or YAML (anything else), field order kept."""
    path = Path(path)
    data = config_to_dict(config)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))


def require_choices(field: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse any of ``values`` not in ``allowed``, naming ``field`` and the choices: the
    check a config's list-of-names field makes before any work starts."""
    allowed = list(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{field}: unknown {unknown}; choose from {allowed}")


def parse_spec(spec: str, what: str = "spec") -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` as ``(name, {key: value})``, values read as YAML scalars.

    One grammar wherever a registered thing is named with options, so a variant is one
    string on the command line and in a config: ``gem:beta=2``, ``rowcol:grid=16``.
    """
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"{what} {spec!r}: expected name or name:key=value,..., got no name")
    options: dict[str, Any] = {}
    for item in rest.split(",") if sep and rest.strip() else ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{what} {spec!r}: expected name:key=value,key=value, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"{what} {spec!r}: {key.strip()}={value!r} is not a value") from None
    return name, options


def coerce_options(target: Any, options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``options`` for calling ``target`` (a class, dataclass or function), each converted to
    the type its parameter is annotated with, so that ``gem:beta=abc`` fails naming ``beta``
    and the type it expects rather than as a comparison deep inside. Unannotated or unknown
    names pass through for ``target`` itself to refuse."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
    else:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    return {k: _coerce(v, hints[k], what, k) if k in hints else v for k, v in options.items()}


def format_spec(name: str, options: Mapping[str, Any]) -> str:
    """The string :func:`parse_spec` reads back to ``(name, options)``."""
    spec = name + "".join((":" if i == 0 else ",") + f"{k}={_spec_value(v)}"
                          for i, (k, v) in enumerate(options.items()))
    try:
        if parse_spec(spec) == (name, dict(options)):
            return spec
    except ValueError:
        pass
    raise ConfigError(f"{name} options {dict(options)} cannot be written as one spec string")


def _spec_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def changed_fields(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted.field: (old, new)}`` where two plain config trees differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: dict[str, tuple[Any, Any]] = {}
        for key in dict.fromkeys([*old, *new]):
            out.update(changed_fields(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {_one_line(err)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of field names at the top level, got {type(data).__name__}"
        )
    return data


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update; a nested override mapping merges into the base's section."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, data: Mapping[str, Any], source: str, prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(fields)}"
            )
            where = value.source if isinstance(value, _Override) else source
            raise ConfigError(f"{where}: unknown field {prefix + key!r} for {cls.__name__}{hint}")
        value = _onto_default(fields[key], value)
        kwargs[key] = _coerce(value, hints[key], source, prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source}: invalid {cls.__name__}"
            f"{' at ' + prefix.rstrip('.') if prefix else ''}: {err}"
        ) from None


def _onto_default(f: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a dataclass-valued field, merged onto that field's default (the
    enclosing config's choice), so a partial section keeps the rest of it."""
    if not isinstance(value, Mapping):
        return value
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return value
    return _merge(config_to_dict(default), value)


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """``value`` converted to field type ``tp``, or a ConfigError naming ``key`` and the type."""
    if isinstance(value, _Override):
        source = value.source
        value = _override_value(value, tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> ConfigError:
        return ConfigError(f"{source}: field {key!r} expects {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, source, key)
            except ValueError:
                continue
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: field {key!r} must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, source, prefix=key + ".")
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise fail()
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail()
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


_NULL_TEXTS = ("", "~", "null", "none", "None")


def _override_value(value: _Override, tp: Any) -> Any:
    """An override's text as a value for ``tp``: itself for string fields, else parsed as YAML."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value.text in _NULL_TEXTS:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _override_value(value, rest[0])
    if tp is str or (origin is Literal and all(isinstance(a, str) for a in args)):
        return value.text
    try:
        return yaml.safe_load(value.text) if value.text else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{value.source}: value is not valid YAML: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    """A parser's message without its multi-line excerpt: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(err, 'problem', err)}"
    return " ".join(str(err).split())


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
