"""The base of every settings section, the error a bad configuration raises, and reading its YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

ENV_PREFIX = "SYNPREF_"


class ConfigError(ValueError):
    """A configuration that cannot be loaded or does not validate."""


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are frozen, and inf/nan floats are refused."""

    # allow_inf_nan=False: a timeout, wait or rate of inf/nan (YAML `.inf`, env `inf`) never ends or
    # never compares; one rule for every float field of every section.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(Section):
    """A reward model to load: its checkpoint path and the version label written to lineage."""

    path: str = ""
    """Checkpoint folder or hub id of an AutoModelForSequenceClassification RM."""
    version: str = ""
    """Version label recorded in lineage; defaults to the folder name."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last, so a second `kafka:`
    block would silently reset every field the first one set."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # Plain keys only: a merge key (<<) may be overridden on purpose, other keys get SafeLoader's checks.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given more than once", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file `path` (empty file: {}); ConfigError if missing, unreadable, invalid (a key given
    twice included), or not a mapping."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a folder (`--config /etc/synpref`), no permission, not text
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data
