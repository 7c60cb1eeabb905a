"""Annotator: preference attributes and LLM judge votes."""
