"""Conversion tools: backbone -> RMT checkpoints (more conversions follow)."""
