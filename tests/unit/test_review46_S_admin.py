"""Review 46, area S: the scorer's admin reload refuses a "version" that is not a string with a 400 naming the field,
before any load, as it does a bad "model" or "path"; on the real admin app over loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from synpref.services.scorer.admin import AdminApi
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry
from synpref.services.scorer.server import _serve_http
from synpref.shared.config import ScorerSettings

TOKEN = "review46-admin-token"


def reload_answers(root: Path, bodies: list[dict[str, Any]]) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The (status, JSON answer) of each reload body, and the paths the registry was asked to load (each load
    fails, so a body that got as far as loading answers 400 "does not load")."""
    loads: list[str] = []

    def factory(kind: str, path: str, *args: Any) -> Any:
        loads.append(path)
        raise ValueError("no model in this test")

    async def main() -> list[tuple[int, dict[str, Any]]]:
        registry = ModelRegistry(ScorerSettings(device="cpu"), ScorerMetrics(), factory)
        runner, port = await _serve_http(AdminApi(registry, TOKEN, str(root)).app(), "127.0.0.1", 0, cancel=False)
        answers = []
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
                for body in bodies:
                    async with session.post(f"http://127.0.0.1:{port}/admin/reload", json=body) as resp:
                        answers.append((resp.status, await resp.json()))
        finally:
            await runner.cleanup()
            await registry.close()
        return answers

    return asyncio.run(asyncio.wait_for(main(), 30)), loads


@pytest.mark.parametrize("version", [3, 0, False, ["v5"], {"v": 5}, 1.5], ids=repr)
def test_a_reload_with_a_version_that_is_not_a_string_is_400_naming_it_before_any_load(
    tmp_path: Path, version: Any
) -> None:
    # Before: str() of it was taken, so 3 served as version "3", ["v5"] as "['v5']", and 0 or false as no version.
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").write_text("{}")
    [(status, answer)], loads = reload_answers(tmp_path, [{"model": "best", "path": "v5", "version": version}])
    assert status == 400 and answer["code"] == 400
    assert '"version" must be a string' in answer["error"] and type(version).__name__ in answer["error"]
    assert loads == []


def test_a_reload_with_a_string_null_or_no_version_goes_on_to_load(tmp_path: Path) -> None:
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").write_text("{}")
    bodies = [{"model": "best", "path": "v5", **extra} for extra in ({"version": "v5"}, {"version": None}, {})]
    answers, loads = reload_answers(tmp_path, bodies)
    assert [status for status, _ in answers] == [400, 400, 400]
    assert all("does not load" in answer["error"] for _, answer in answers)
    assert loads == [str((tmp_path / "v5").resolve())] * 3
