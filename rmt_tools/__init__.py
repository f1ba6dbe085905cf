"""Offline helpers that the applications share (training, demo, model cards, benchmarks, tests): where the bundled
MiniLM backbone is, and what the hardware does well. They import only torch and the standard library; no Hub file
imports them."""
