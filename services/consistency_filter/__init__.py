"""Consistency filter: Stage-1 routing and the Stage-2 KEEP / FLIP / DISCARD rule."""
