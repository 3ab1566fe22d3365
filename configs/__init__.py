"""Typed configs, the named presets and the loader (presets < YAML file < flags < --set)."""

from configs.schema import Config, ConfigError, from_dict, to_dict, with_overrides  # noqa: F401
from configs.presets import PRESETS, load  # noqa: F401
