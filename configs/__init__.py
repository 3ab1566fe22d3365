"""Typed configs, the named presets and the loader (presets < YAML file < flags < --set)."""

from configs.loading import from_dict, merge, parse_set, to_dict, with_overrides  # noqa: F401
from configs.presets import PRESETS, load  # noqa: F401
from configs.schema import Config, ConfigError  # noqa: F401
