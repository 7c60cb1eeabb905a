"""The two reward-model roles, named once.

GOLD is the RM trained on human-verified pairs (D_gold); BEST is the best RM so far (the
best working RM of Stage 1; the final, curated RM once registered). The names are the
ModelScore.model values on pair records, the scorer's served model names and the keys of
models/registry.json. (D_gold, the pool of human-verified pairs, is a pool name in
services/controller/state.py, not a role.)
"""

from __future__ import annotations

from typing import Final

GOLD: Final = "gold"
BEST: Final = "best"
