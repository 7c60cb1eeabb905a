"""Checks of the SYNPREF_* environment variables that pydantic-settings would otherwise ignore (config.py).

A variable with `__` (SYNPREF_<SECTION>__<FIELD>) can only be a setting, so one of no section is an error. A
variable without `__` is a setting only when it names a top-level field (SYNPREF_LOG_LEVEL, SYNPREF_KAFKA as
JSON): the prefix is shared with the project's other variables (NOT_SETTINGS), with the Service links
Kubernetes gives every pod of `helm install synpref` (SYNPREF_SCORER_SERVICE_HOST, ...) and with any variable
an operator names for a judge's API key. So only a name close to a field (a typo: SYNPREF_LOG_LEVLE) or a
section's field written with one `_` (SYNPREF_SCORER_PORT=50061 for SYNPREF_SCORER__PORT) is an error; any
other unknown one is logged as ignored. A Service link can spell a section's field too (Kubernetes gives
SYNPREF_SCORER_PORT=tcp://10.0.0.7:50060 for the Service synpref-scorer): its value tells it apart.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Collection, Mapping

from synpref.shared.config_base import ENV_PREFIX, ConfigError

log = logging.getLogger(__name__)

NOT_SETTINGS = frozenset(
    ENV_PREFIX + name
    for name in (
        "CONFIG",  # the settings file (config.load_settings)
        "JOB_NAME",  # a training Job's pod: its own Job (training/k8s_job.py, the chart)
        "TRAIN_JOB_SPEC",  # the controller: the chart's training Job spec (training/k8s_job.py)
        "KAFKA_BOOTSTRAP",  # tests: an external broker (tests/conftest.py)
        "KAFKA_HOME",  # `make kafka`, testing/local_kafka.py: where the Kafka jars are
        "TEST_KEY",  # tests/unit/test_judges.py: a judge's key
        "IMAGE_EXTRAS",  # tools/cluster/project-images.sh
        "CLUSTER_TESTS",  # tools/cluster/*.sh and tests/cluster
        "CLUSTER_UNAVAILABLE",
        "CLUSTER_REQUIRED",
        "CLUSTER_DISK_GB",
        "CLUSTER_PVS",
        "CLUSTER_PV_SIZE",
    )
)
"""The project's SYNPREF_ variables that are not settings (found in the Makefile, charts, tools, tests)."""

# Kubernetes' Service links: <SERVICE>_SERVICE_HOST, _SERVICE_PORT[_<PORT NAME>], _PORT[_<N>_<PROTO>[_PROTO|PORT|ADDR]].
_SERVICE_LINK = re.compile(r"(.*_)?(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")

# A bare <SERVICE>_PORT link (not _SERVICE_PORT, not _PORT_<N>_TCP_PORT) and its value: the first port as a URL.
_BARE_PORT_LINK = re.compile(r"(?!.*(SERVICE|_TCP|_UDP|_SCTP)_PORT$)(.*_)?PORT")
_PORT_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://\S+")

_TYPO_CUTOFF = 0.8
"""difflib ratio from which an unknown name is taken for a misspelt field: LOG_LEVLE (0.89), DESKS (0.89)."""


def check_env_sections(environ: Mapping[str, str], sections: Collection[str]) -> None:
    """ConfigError for a SYNPREF_<SECTION>__<FIELD> variable of no section in `sections`: pydantic-settings
    would ignore SYNPREF_SCORRER__PORT."""
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and "__" in name
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in sections
    )  # fmt: skip
    if unknown:
        known = ", ".join(sorted(sections))
        raise ConfigError(f"unknown section in environment variable(s) {', '.join(unknown)}; known sections: {known}")


def check_env_names(
    environ: Mapping[str, str],
    fields: Collection[str],
    also: Collection[str] = (),
    sections: Mapping[str, Collection[str]] | None = None,
) -> None:
    """ConfigError for a SYNPREF_<NAME> variable (no `__`) that looks like a misspelt top-level field of
    `fields`, or like a field of one of `sections` (section name: its fields) with `_` for `__`; a warning for
    any other that is no field, not in NOT_SETTINGS or `also` (the judges' key variables) and not a Kubernetes
    Service link. See the module docstring."""
    others = NOT_SETTINGS | {name.upper() for name in also}
    typos: list[str] = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or "__" in name or upper in others:
            continue
        rest = upper[len(ENV_PREFIX) :].lower()
        if rest in fields:
            continue
        link = _SERVICE_LINK.fullmatch(rest.upper()) is not None
        if link and _BARE_PORT_LINK.fullmatch(rest.upper()):
            link = _PORT_LINK_VALUE.fullmatch(environ[name].strip()) is not None
        nested = _nested_name(rest, sections or {})
        if nested and not link:
            typos.append(f"{name} (did you mean {ENV_PREFIX}{nested.upper()}?)")
            continue
        if link:
            continue
        ratio, closest = max((difflib.SequenceMatcher(None, rest, f).ratio(), f) for f in fields)
        if ratio >= _TYPO_CUTOFF:
            typos.append(f"{name} (did you mean {ENV_PREFIX}{closest.upper()}?)")
        else:
            log.warning(
                "%s is not a setting and is ignored (the closest is %s%s; nested settings take __)",
                name,
                ENV_PREFIX,
                closest.upper(),
            )
    if typos:
        raise ConfigError(f"unknown setting in environment variable(s) {', '.join(typos)}")


def _nested_name(rest: str, sections: Mapping[str, Collection[str]]) -> str | None:
    """`section__field` when `rest` (lower case) is a section's name and one of its fields joined by one `_`."""
    for i, char in enumerate(rest):
        if char == "_" and rest[i + 1 :] in sections.get(rest[:i], ()):
            return f"{rest[:i]}__{rest[i + 1 :]}"
    return None
