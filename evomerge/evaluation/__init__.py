"""Evaluation: evomerge's generated skills as lm-eval tasks, and the in-memory Evaluator.

The search optimises a merged model's score on each task's ``search`` split and
reports the held-out ``test`` split. Tasks are ordinary lm-eval YAML (kept in
``evomerge/evaluation/tasks`` and materialised with absolute data paths by
:func:`materialise_tasks`); users may add their own task directories and name any
lm-eval task.
"""
from evomerge.evaluation.data import N_SEARCH, N_TEST, SKILLS, eval_items
from evomerge.evaluation.evaluator import Evaluator, quiet_lm_eval
from evomerge.evaluation.taskdir import materialise_tasks, task_groups, task_name

__all__ = ["N_SEARCH", "N_TEST", "SKILLS", "eval_items", "Evaluator", "quiet_lm_eval",
           "materialise_tasks", "task_groups", "task_name"]
