"""Cluster sweeps: many workers, one Optuna study in a shared storage, an exact budget, one export.

``storage`` (PostgreSQL, journal heartbeats, the study mutex), ``budget`` (the
gate every trial passes), ``final`` (the one final export), ``session`` (a
worker). See docs/cluster.md.
"""
