"""The base of every settings section, the error a bad configuration raises, reading its YAML file, and the
settings of one LLM judge (with its key rule)."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import takewhile
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

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


def default_api_key_env(base_url: str) -> str:
    """The key variable of a judge that names none: OPENAI_API_KEY for OpenAI's own API over https, else "" (no
    key). The OpenAI key must not reach a local server or another provider, nor cross a network in clear text."""
    url = urlsplit(base_url.strip())
    return "OPENAI_API_KEY" if url.scheme.lower() == "https" and url.hostname == "api.openai.com" else ""


class JudgeSettings(Section):
    """One LLM judge on an OpenAI-compatible endpoint: model name, URL, API-key variable, samples, temperature,
    prompt budget."""

    name: str
    """Model name sent to the OpenAI-compatible endpoint; unique among the judges."""
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = ""
    """Name of the environment variable holding the API key (never the key itself); "" = no key. Unset: OPENAI_API_KEY
    for https://api.openai.com, no key for any other endpoint (name its variable there)."""
    samples: int = Field(default=3, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)
    max_prompt_chars: int = Field(default=0, ge=0)
    """Most characters of a prompt (system + user messages) sent to this model; 0 = no limit. Over it, a judge drops
    retrieved examples (least similar first) until it fits, and a pair that does not fit without any is not sent (a
    server answers HTTP 400 past its context length): its samples abstain. An 8k-token judge: ~24,000 (English text
    runs ~3.5-4 characters a token; leave room for max_tokens)."""

    @model_validator(mode="before")
    @classmethod
    def _default_key_env(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key_env" not in data:
            base_url = data.get("base_url", cls.model_fields["base_url"].default)
            return {**data, "api_key_env": default_api_key_env(str(base_url))}
        return data


class _Named(Protocol):
    @property
    def name(self) -> str: ...


NamedT = TypeVar("NamedT", bound=_Named)


def unique_judges(judges: list[NamedT]) -> list[NamedT]:
    """`judges`, or ValueError naming a judge name given twice: the name keys the answer cache, the Candidate 1/2
    order and the judge's majority vote (a simulated judge's seeded belief too), so two such judges would read
    each other's answers and vote as one."""
    names = [j.name for j in judges]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"judge name(s) {twice} given more than once; give one judge more samples instead")
    return judges


Judges = Annotated[list[NamedT], AfterValidator(unique_judges)]
"""A list of judges with unique names: `Judges[JudgeSettings]` (annotator.judges), `Judges[SimulatedJudgeSettings]`
(controller.study.judges)."""


def value_origin(loc: tuple[int | str, ...], environ: Mapping[str, str], path: str | Path | None) -> str:
    """Where the value at `loc` (a pydantic error's) could have come from: the SYNPREF_ variables in `environ` that
    could have set it (its own, a section above it set as JSON, or, for an error about a whole section, one below
    it), and the YAML file `path` unless the field's own variable set it (the environment beats the file; a
    section's JSON is merged with the file's section, so it may not hold the field)."""
    keys = [str(k).upper() for k in takewhile(lambda k: isinstance(k, str), loc)]
    own = [ENV_PREFIX + "__".join(keys[:i]) for i in range(1, len(keys) + 1)]
    names = sorted(n for n in environ if n.upper() in own or (own and n.upper().startswith(own[-1] + "__")))
    origins = [f"set by {', '.join(names)}"] if names else []
    if path and not (own and own[-1] in (n.upper() for n in names)):
        origins.append(f"in {path}")
    return " or ".join(origins)


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
