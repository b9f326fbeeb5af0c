"""Cluster sweeps: many workers, one Optuna study in a shared storage, an exact budget, one export.

``storage`` (the study mutex), ``budget`` (the gate every trial passes),
``export_claim`` (the one final evaluation and export), ``manifest`` (which
storage and study a shared folder belongs to). A worker is the one search
session with the shared coordination (evomerge/run/cluster.py). See docs/cluster.md.
"""
