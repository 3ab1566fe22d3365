"""Building a Config from nested dicts (presets, YAML, flags, --set) and back. Every key is
checked: an unknown one is an error naming it; every value is coerced to its field's type."""

from __future__ import annotations

import dataclasses
import unicodedata

from configs.schema import Config, ConfigError, _require


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value, annotation, key: str):
    hint = annotation
    if isinstance(hint, str):
        hint = {"int": int, "float": float, "str": str, "bool": bool}.get(hint, hint)
    if hint is bool:
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"expected a number, got {value!r}")
        value = float(value)
    elif hint is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
    elif hint == "tuple[str, ...]":  # a YAML list, or "A,B" from --set
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        _require(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), key,
                 f"expected a list of names, got {value!r}")
        value = tuple(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build cls from a nested dict; an unknown key is an error naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"Unknown config key '{full}' (known: {', '.join(sorted(fields))})")
        f = fields[key]
        if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING else False:
            kwargs[key] = from_dict(f.default_factory, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, f.type, full)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def merge(base: dict, over: dict) -> dict:
    """over on top of base, recursively (nested dicts merge, anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(cfg: Config, overrides: dict) -> Config:
    """Apply a nested dict of overrides; validation runs again on the result."""
    return from_dict(Config, merge(to_dict(cfg), overrides))


def _scalar(raw: str, yaml):
    """int, then float (so 1e-3 is a number: YAML 1.1 wants a dot), then YAML (true, null, ...)."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    if raw == "" or any(unicodedata.category(ch) == "Cc" for ch in raw):
        return raw  # YAML would fold a newline away or raise: keep the text for the checks
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # e.g. '[1,': not a YAML scalar, so the text as given


def parse_set(assignments: list[str]) -> dict:
    """['train.max_steps=10', 'model.dropout=0'] -> nested dict, values parsed as YAML scalars."""
    import yaml

    nested: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
        value = _scalar(raw, yaml)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested
