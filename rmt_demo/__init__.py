"""The first-hour demo: the trained rmt-minilm finds one fact hidden in a 100k-token document (`python -m rmt_demo`).

An application on top of `modeling_rmt` and `rmt_training.tasks` (its documents); never uploaded with a model.
"""
