"""The whole path in one place: the Hydra app (``app``) runs a search session (``session``: models,
evaluator and study set up once, then search, final scoring and the export), or one worker of a
shared study (``cluster``). Everything below it (checkpoints, methods, engine, evaluation, zoo,
search, export) is a library this package drives; nothing there imports it back.
"""
