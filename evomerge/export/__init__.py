"""Exporting results: model cards, winners' model directories, reports."""
