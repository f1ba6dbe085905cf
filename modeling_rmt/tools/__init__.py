"""Command-line tools, demos and helpers that are not uploaded with a model (no Hub file imports them)."""
