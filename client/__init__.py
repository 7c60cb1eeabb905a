"""Python client for the SynPref RewardService (sync and asyncio)."""
