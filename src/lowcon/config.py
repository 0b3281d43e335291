"""Configs: flat dataclasses loaded from flat YAML files, with command-line overrides.

An unknown key is an error that names the key and lists the valid ones; every run saves the
resolved config next to its checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Type, TypeVar

import yaml

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "save_config", "parse_overrides", "preset_path", "list_presets"]

T = TypeVar("T")
PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the file."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a preset shipped with lowcon (e.g. ``aecrnet``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"{name_or_path}: no such config file or preset; presets: {', '.join(list_presets())}")


def read_yaml(path: str | os.PathLike) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict:
    """``["lr=1e-4", "layer_weights=[1, 1]"]`` -> dict, values parsed as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or value is None:
        return value
    if origin is typing.Union:
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {name}: {value!r} does not fit {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and "," in value:  # `--set nce_layers=0,4,8` from a shell
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        items = [_coerce(name, v, item, source) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {name}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        return str(value)
    return value


def from_dict(cls: Type[T], data: Mapping[str, Any], source: str = "config") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(k, v, hints[k], source) for k, v in data.items()}
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_config(cls: Type[T], path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file at `path`, then by `overrides`. Where `cls` has a
    ``method_defaults(method)`` classmethod, the defaults of the method the file or the overrides
    name come first (:meth:`lowcon.translation.TranslationConfig.method_defaults`)."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        data.update(read_yaml(path))
        source = str(path)
    if overrides:
        data.update(overrides)
        source += " + overrides"
    method_defaults = getattr(cls, "method_defaults", None)
    if method_defaults is not None and "method" in data:
        data = {**method_defaults(data["method"]), **data}
    return from_dict(cls, data, source)


def to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none: what a one-line
    report of a library's multi-line error shows."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file onto `path` in one step, with an ordinary file's mode under
    the process's umask (``mkstemp`` makes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
