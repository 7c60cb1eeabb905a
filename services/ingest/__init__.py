"""Ingest: read pair files, normalize to v1 pairs, drop empty, duplicate and contaminated pairs."""
