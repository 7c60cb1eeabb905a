"""The vLLM backend's close shuts its engine down: `del self.llm` left the engine core (a process of its own) holding
the weights and KV cache, so a reload could run out of GPU memory. vLLM cannot run here: the LLM is a stand-in."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from synpref.services.scorer.backends import VllmBackend


def backend_with(llm: object) -> VllmBackend:
    backend = object.__new__(VllmBackend)  # __init__ needs vLLM on a GPU
    backend.llm = llm
    return backend


def test_close_calls_llm_shutdown_once() -> None:
    calls: list[str] = []
    backend = backend_with(SimpleNamespace(shutdown=lambda: calls.append("llm")))
    backend.close()
    backend.close()  # a second close (reload, then service shutdown) is a no-op
    assert calls == ["llm"] and backend.llm is None


def test_close_falls_back_to_the_engine_core_shutdown() -> None:
    calls: list[str] = []
    core = SimpleNamespace(shutdown=lambda: calls.append("core"))
    backend_with(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core))).close()
    assert calls == ["core"]


def test_a_failed_shutdown_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("engine core already dead")

    backend = backend_with(SimpleNamespace(shutdown=broken))
    with caplog.at_level(logging.ERROR):
        backend.close()
    assert backend.llm is None and "shutting the vLLM engine down failed" in caplog.text


def test_an_engine_without_shutdown_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        backend_with(SimpleNamespace()).close()
    assert "no engine shutdown" in caplog.text
