"""The base of every settings section, and the error a bad configuration raises."""

from __future__ import annotations

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
