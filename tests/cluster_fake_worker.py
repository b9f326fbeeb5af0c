"""A cluster worker with the real gate, loop, storage and export claim, but no model: a trial sleeps.

Run as a script by tests/test_cluster.py, many at once, to hammer the budget
gate in seconds. ``--die-at K`` SIGKILLs this process in the middle of its
K-th trial (after it started, before it finished), the worst moment to die.
Prints one JSON line: the trials it ran and whether it won the final claim.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna


class Genome:
    seed = 0

    def distributions(self) -> dict:
        return {"x": optuna.distributions.FloatDistribution(0.0, 1.0),
                "y": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def baselines(self) -> dict:
        return {"low": {"x": 0.0, "y": 0.0}, "high": {"x": 1.0, "y": 1.0}}

    def recipe(self, params: dict, seed: int = 0) -> dict:
        return dict(params)


class Engine:
    model = None

    def __init__(self) -> None:
        self.params: dict = {}

    def apply(self, recipe: dict) -> SimpleNamespace:
        self.params = recipe
        return SimpleNamespace(seconds=0.0)


class Scorer:
    def __init__(self, engine: Engine, delay: float, die_at: int | None, started: Path | None = None) -> None:
        self.engine, self.delay, self.die_at, self.calls, self.started = engine, delay, die_at, 0, started

    def score(self, model, split, limit) -> SimpleNamespace:
        self.calls += 1
        if self.started is not None:
            self.started.touch()  # the others may start: this worker holds a trial
        if self.die_at is not None and self.calls == self.die_at:
            time.sleep(self.delay / 2)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        v = float(self.engine.params["x"]) + 0.1 * float(self.engine.params["y"])
        return SimpleNamespace(values=[v], fitness=v, metrics={"t": {"acc": v}}, seconds=self.delay)

    def can_split(self, split) -> bool:  # the loop then scores each trial at once, through score()
        return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", required=True)
    p.add_argument("--url", default=None)
    p.add_argument("--path", default=None)
    p.add_argument("--study", default="fake")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.02)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--die-in-gate", type=int, default=None, help="SIGKILL right after taking the K-th trial, mutex held")
    p.add_argument("--worker", default="0")
    p.add_argument("--heartbeat", type=int, default=1)
    p.add_argument("--grace", type=int, default=3)
    p.add_argument("--started", default=None, help="touch this file at the first candidate (the victim)")
    p.add_argument("--wait-for", default=None, help="take no trial before this file exists (the survivors)")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    from evomerge.search import driver
    from evomerge.search.cluster import export_claim
    from evomerge.search.cluster.budget import Gate
    from evomerge.search.cluster.storage import study_mutex
    from evomerge.search.storage import make_storage

    cfg = {"kind": args.kind, "url": args.url, "path": args.path, "heartbeat_interval": args.heartbeat,
           "grace_period": args.grace}
    storage = make_storage(cfg, Path(args.path or ".").parent, driver.retry_trial)
    mutex = study_mutex(storage, args.study)
    genome = Genome()
    with mutex:
        study = optuna.create_study(study_name=args.study, storage=storage, direction="maximize", load_if_exists=True)
        driver.enqueue_baselines(study, genome.baselines())
    engine = Engine()
    label = f"{args.worker}@pid{os.getpid()}"
    sampler_for = lambda start: optuna.samplers.RandomSampler(seed=int(args.worker))  # noqa: E731
    gate = Gate(study, mutex, args.n, label, poll_s=0.2)
    loop = driver.SearchLoop(study, sampler_for, optuna.pruners.NopPruner(), genome, engine,
                             Scorer(engine, args.delay, args.die_at, Path(args.started) if args.started else None),
                             n_trials=args.n, limit=None, seed=0, fresh_seeds=False,
                             progress=False, budget=gate)
    if args.die_in_gate is not None:  # the gate asks the mirror for the trial with the mutex held
        inner, asked = loop.mirror, []
        orig = inner.ask

        def ask(dists):
            trial = orig(dists)
            asked.append(trial.number)
            if len(asked) == args.die_in_gate:
                os.kill(os.getpid(), signal.SIGKILL)
            return trial

        inner.ask = ask
    if args.wait_for:  # a victim that starts last on a loaded machine would find the budget spent
        deadline = time.time() + 120
        while not Path(args.wait_for).exists() and time.time() < deadline:
            time.sleep(0.05)
    loop.run()
    won, claim = export_claim.claim(study, mutex, label, Path("."), watch_s=None)
    if won:
        with export_claim.beating(study, claim, 0.2):
            time.sleep(0.5)
    print(json.dumps({"worker": label, "ran": loop.ran, "won": won, "healed": gate.healed}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
