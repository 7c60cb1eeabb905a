"""Review 45, R10: the controller's publish to the scorer takes only the scorer's own answer as done."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from synpref.services.controller import publish
from synpref.shared.scorer_admin import ScorerAdminError
from testing.json_api import JsonHandler, serving

REGISTRY = {"best": {"path": "/data/models/final/final", "version": "final-rm-final-abc-a1"}}


def answering(answer: Any) -> type[JsonHandler]:
    """An admin port that answers every POST with 200 and `answer` (None: the model and version asked)."""

    class Port(JsonHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked = {"model": body["model"], "version": body["version"], "model_id": body["path"]}
            self.reply(200, asked if answer is None else answer)

    return Port


@pytest.fixture
def url_of() -> Iterator[Any]:
    with ExitStack() as stack:
        yield lambda answer: stack.enter_context(serving(answering(answer)))


@pytest.mark.parametrize(
    "answer",
    [
        {},  # an empty 200 (a proxy, a misrouted Service)
        {"status": "ok"},  # another service's JSON
        {"model": "best", "version": "final-rm-final-old-a1", "model_id": "/old"},  # still the old version
    ],
)
def test_a_200_that_is_not_the_scorer_serving_the_model_is_no_success(url_of, answer) -> None:
    # Before: any JSON object answered with 200 was logged as "scorer reloaded" and the run went on with the old model.
    with pytest.raises(ScorerAdminError, match=r"answered the reload of best .*not a scorer serving it"):
        publish.reload_scorer(url_of(answer), REGISTRY, timeout_s=5, wait_s=5)


def test_the_scorers_own_answer_is_success(url_of, caplog) -> None:
    caplog.set_level("INFO", logger=publish.__name__)
    publish.reload_scorer(url_of(None), REGISTRY, timeout_s=5, wait_s=5)
    assert '"version": "final-rm-final-abc-a1"' in caplog.text
