"""The pass-through stage: each input goes, unchanged, to one output route."""
