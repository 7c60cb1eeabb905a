"""Loading the head trainer's backbone prints nothing a user should act on, and restores transformers' settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from synpref.services.controller.models import FeatureCache, default_backbone


def test_backbone_load_prints_no_missing_head_report(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        FeatureCache(default_backbone(), 32, tmp_path)
        out, err = capfd.readouterr()
        # The classifier is new on purpose (the head trainer trains it): transformers' report told users to train it.
        assert "MISSING" not in out + err
        assert "LOAD REPORT" not in out + err
        assert "Loading weights" not in out + err
        assert hf_logging.get_verbosity() == hf_logging.WARNING
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
