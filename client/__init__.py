"""Python client for the SynPref RewardService (sync and asyncio); `synpref score` is cli.py."""

from synpref.client.client import (
    AsyncRewardClient,
    PairScore,
    RewardClient,
    ScoreSession,
    check_tokenizer,
)
from synpref.client.messages import TokenIds

__all__ = ["AsyncRewardClient", "PairScore", "RewardClient", "ScoreSession", "TokenIds", "check_tokenizer"]
