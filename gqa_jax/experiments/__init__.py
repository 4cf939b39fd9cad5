"""The experiment wing: grids of runs, sweeps, the decoding benchmark and the figures.

It sits above training (it runs `gqa-jax` stages and reads their outputs) and below the
cli; nothing in the core or the training layer imports it (tests/test_layering.py).
"""
