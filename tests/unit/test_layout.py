"""The source stays readable: no module of the product over 450 lines (issue 14's rule)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 450


def test_no_product_module_is_over_450_lines():
    files = [p for folder in ("shared", "services", "training", "client") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, f"split these modules (limit {LIMIT} lines): {long}"
