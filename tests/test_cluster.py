"""Cluster sweeps on real servers: PostgreSQL and journal storages, concurrent workers, SIGKILL, submitit.

Two layers. Model-free workers (tests/cluster_fake_worker.py: the real gate,
loop, storages and final claim around a trial that sleeps) hammer the budget
in seconds, including deaths at the worst moments. Then the real ``evomerge``
app runs as concurrent worker processes on a small random model family with a
cut-down lm-eval task: exact budget, nothing lost or duplicated, a worker
SIGKILLed mid-trial and its trial retried, one export, no password anywhere.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.search import driver
from pg_server import PASSWORD, PgServer, find_bin

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
FAKE = [sys.executable, str(HERE / "cluster_fake_worker.py")]
APP = [sys.executable, "-m", "evomerge.run.app"]
STUDY = "ties_math-user_example"


@pytest.fixture(scope="module")
def pg():
    if not (find_bin("initdb") and find_bin("pg_ctl")):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def _check_exact(trials: list, n: int, baselines: set[str]) -> dict[int, optuna.trial.FrozenTrial]:
    """The guarantees every sweep must give; returns {killed number: its retry}."""
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # no duplicate (or missing) trial numbers
    retried = driver.retry_of(trials)
    finished = [t for t in trials if driver.is_finished(t, retried)]
    assert len(finished) == n, Counter(t.state.name for t in trials)  # exactly the budget
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    names = Counter(t.user_attrs["baseline"] for t in finished if "baseline" in t.user_attrs)
    assert set(names) == baselines and set(names.values()) == {1}  # every baseline once
    searched = [tuple(sorted(t.params.items())) for t in finished if "baseline" not in t.user_attrs]
    assert len(set(searched)) == len(searched)  # no two workers ran the same candidate
    retries = {}
    for t in trials:
        if t.state == TrialState.FAIL and t.number in retried:  # a dead trial: retried once, same parameters
            again = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
            assert len(again) == 1 and again[0].params == t.params
            assert driver.is_finished(again[0], retried) or again[0].number in retried
            retries[t.number] = again[0]
    return retries


def _fake(kind: str, where: str, n: int, worker: int, *extra: str) -> subprocess.Popen:
    loc = ["--url", where] if kind == "postgres" else ["--path", where]
    return subprocess.Popen([*FAKE, "--kind", kind, *loc, "--n", str(n), "--worker", str(worker), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fake_sweep(kind: str, where: str, n: int, workers: int, victim_args: list[str], started: Path) -> list[dict]:
    """The victim (worker 1) takes a trial first; the others start their loops once it has (else, starting last
    on a loaded machine, it could find the budget spent and never die)."""
    procs = [_fake(kind, where, n, w, *([*victim_args, "--started", str(started)] if w == 1 else
                                        ["--wait-for", str(started)])) for w in range(workers)]
    outs = []
    for w, p in enumerate(procs):
        out, err = p.communicate(timeout=180)
        if w == 1:
            assert p.returncode == -signal.SIGKILL, err[-2000:]
        else:
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


# ---- model-free workers: the budget gate under contention and deaths --------------------------
@pytest.mark.parametrize("kind", ["postgres", "journal"])
@pytest.mark.parametrize("death", ["mid_trial", "inside_gate"])
def test_budget_is_exact_when_a_worker_dies(kind, death, request, tmp_path):
    where = request.getfixturevalue("pg").create_database(f"fake_{death}") if kind == "postgres" else str(tmp_path / "s.journal")
    victim = ["--die-at", "3"] if death == "mid_trial" else ["--die-in-gate", "2"]
    n, workers = 20, 3
    outs = _fake_sweep(kind, where, n, workers, victim, tmp_path / "victim-started")
    study = optuna.load_study(study_name="fake", storage=where if kind == "postgres" else _journal(Path(where)))
    trials = study.get_trials()
    retries = _check_exact(trials, n, {"low", "high"})
    assert len(retries) == 1  # the victim's trial, failed and run again by another worker
    killed = trials[next(iter(retries))]
    if death == "mid_trial":  # the victim had started it
        assert killed.user_attrs["worker"].startswith("1@")
    else:  # the victim died holding the mutex, before marking it started: a survivor healed it
        assert "worker" not in killed.user_attrs and sum(o["healed"] for o in outs) == 1
    assert not retries[killed.number].user_attrs["worker"].startswith("1@")
    assert sum(o["won"] for o in outs) == 1  # exactly one final claim
    final = study._storage.get_study_system_attrs(study._study_id)["evomerge:final"]  # noqa: SLF001
    assert final["done"] and final["worker"] == next(o["worker"] for o in outs if o["won"])


_LOCKER = """
import os, sys, time
from pathlib import Path
from evomerge.locks import FileMutex
lock, log, rounds, die = FileMutex(Path(sys.argv[1])), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "die"
for i in range(rounds):
    with lock:
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\\n")
        if die:
            os.kill(os.getpid(), 9)
        time.sleep(0.005)
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\\n")
"""


def test_file_mutex_excludes_processes_and_outlives_a_killed_holder(tmp_path):
    """Four processes take the lock 40 times each while a fifth dies holding it: never two inside at once,
    and the dead holder's lock is free at once (Optuna's lock files are broken only after a grace period,
    and two waiters could break them together)."""
    lock, log = tmp_path / "s.lock", tmp_path / "log"
    start = time.monotonic()
    victim = subprocess.run([sys.executable, "-c", _LOCKER, str(lock), str(log), "1", "die"], capture_output=True)
    assert victim.returncode == -signal.SIGKILL
    procs = [subprocess.Popen([sys.executable, "-c", _LOCKER, str(lock), str(log), "40", "live"],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    assert time.monotonic() - start < 60  # no 30 s wait on the dead holder's lock
    lines = log.read_text().split("\n")[1:-1]  # the victim's lone "in" first
    assert len(lines) == 2 * 4 * 40
    for enter, leave in zip(lines[::2], lines[1::2]):  # every entry is followed by the same process leaving
        assert enter.startswith("in ") and leave == "out " + enter[3:]
    from evomerge.errors import ConfigError
    from evomerge.locks import FileMutex

    with pytest.raises(ConfigError, match=r"cannot lock .*/gone/s\.lock: No such file or directory; check that the folder"):
        FileMutex(tmp_path / "gone" / "s.lock").acquire()


def test_final_claim_is_taken_over_only_from_a_dead_exporter(tmp_path):
    from evomerge.search.cluster import export_claim
    from evomerge.search.record import claim_of
    from evomerge.locks import FileMutex

    study = optuna.create_study(study_name="s", storage=_journal(tmp_path / "j"))
    mutex = FileMutex(tmp_path / "j.mutex")
    won, rec = export_claim.claim(study, mutex, "A", tmp_path, watch_s=None)
    assert won and rec.worker == "A"
    assert export_claim.claim(study, mutex, "B", tmp_path, watch_s=None) == (False, claim_of(study))
    with export_claim.beating(study, rec, 0.2):  # A alive: B watches the beat move and backs off
        won_b, now = export_claim.claim(study, mutex, "B", tmp_path, watch_s=1.0, poll_s=0.3)
    assert not won_b and now.worker == "A"
    assert claim_of(study).done
    study2 = optuna.create_study(study_name="s2", storage=study._storage)  # noqa: SLF001
    export_claim.claim(study2, mutex, "A", tmp_path, watch_s=None)  # A claims, then dies: its beat freezes
    won_c, rec_c = export_claim.claim(study2, mutex, "C", tmp_path, watch_s=0.8, poll_s=0.2)
    assert won_c and rec_c.took_over_from == "A"


def test_passwords_never_shown(pg):
    from evomerge.errors import ConfigError
    from evomerge.search.backends import mask_url, postgres_storage

    url = pg.url()
    assert PASSWORD not in mask_url(url) and "***" in mask_url(url)
    bad = url.replace(PASSWORD, PASSWORD + "-wrong")
    with pytest.raises(ConfigError) as exc:
        postgres_storage({"url": bad}, None)
    assert PASSWORD not in str(exc.value) and "***" in str(exc.value) and "password" in str(exc.value)
    storage = postgres_storage({"url": url, "heartbeat_interval": 5}, None)
    from evomerge.search.storage import heartbeat_enabled, storage_url

    study = optuna.create_study(storage=storage)
    assert PASSWORD not in storage_url(storage)
    assert heartbeat_enabled(study._storage)  # noqa: SLF001 - also through Optuna's cache wrapper


# ---- the real app: concurrent worker processes on a small model family --------------------------
@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A base and two fine-tunes (tiny random Llamas) and the add task cut to 60 search / 40 test items."""
    from evomerge.evaluation import materialise_tasks
    from model_factory import make_family

    root = tmp_path_factory.mktemp("cluster_fam")
    base, fts = make_family(root / "models", "llama", n_models=2, layers=2)
    tasks = materialise_tasks(root / "tasks", ["add"])
    for split, keep in (("search", 60), ("test", 40)):
        path = tasks / "data" / "add" / f"{split}.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))
    return base, fts, tasks


def _args(fam, n_trials: int, *extra: str) -> list[str]:
    base, fts, tasks = fam
    return ["+search=ties_math", "models=user_example", f"models.base={base}",
            f"models.specialists={{m0: {fts[0]}, m1: {fts[1]}}}", f"models.task_dirs=[{tasks}]", "tasks.group=null",
            "tasks.tasks={evomerge_add_ll: {acc: 1.0}}", f"search.n_trials={n_trials}", "search.limit=null",
            "search.pruning.enabled=false", "progress=false", "final.top_k=1", "batch_size=16",
            "cluster.heartbeat_interval=1", "cluster.grace_period=3", "cluster.poll_s=0.3", *extra]


def _pid(t) -> int | None:
    w = t.user_attrs.get("worker")
    return None if w is None else int(w.split("@", 1)[1].split(":")[1].split("/")[0])


def _kill_mid_trial(procs: list[subprocess.Popen], open_study, logs: list[Path],
                    timeout: float = 300) -> tuple[subprocess.Popen, list[int]]:
    """SIGKILL a worker while it runs a trial, once two workers have run trials (so they overlap).

    The worker is frozen (SIGSTOP) first; it is killed only if the storage then shows it holding a
    started trial, so the kill lands between taking the trial and finishing it."""
    deadline, study = time.time() + timeout, None
    by_pid = {p.pid: p for p in procs}
    while time.time() < deadline:
        ended = [i for i, p in enumerate(procs) if p.poll() is not None]
        if ended:
            pytest.fail(f"worker {ended[0]} ended ({procs[ended[0]].poll()}) before one could be killed:\n"
                        + logs[ended[0]].read_text()[-4000:])
        if study is None:
            try:
                study = open_study()
            except Exception:  # noqa: BLE001 - not created yet
                time.sleep(0.3)
                continue
        trials = study.get_trials(deepcopy=False)
        if len({_pid(t) for t in trials} - {None}) < 2:
            time.sleep(0.1)
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and _pid(t) in by_pid]
        if not running:
            time.sleep(0.05)
            continue
        victim = by_pid[_pid(running[0])]
        os.kill(victim.pid, signal.SIGSTOP)
        mine = [t.number for t in study.get_trials(deepcopy=False)
                if t.state == TrialState.RUNNING and _pid(t) == victim.pid]
        if mine:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            return victim, mine
        os.kill(victim.pid, signal.SIGCONT)
    pytest.fail("no worker was seen running a trial")


def _run_sweep(fam, tmp_path: Path, n_trials: int, workers: int, storage: list[str], env: dict, open_study):
    shared = tmp_path / "shared"
    log_paths = [tmp_path / f"w{i}.out" for i in range(workers)]
    logs = [path.open("w") for path in log_paths]
    procs = [subprocess.Popen([*APP, *_args(fam, n_trials, *storage, f"cluster.dir={shared}"), f"worker={i}",
                               f"hydra.run.dir={tmp_path / f'w{i}'}"], stdout=logs[i], stderr=subprocess.STDOUT, env=env)
             for i in range(workers)]
    try:
        victim, killed = _kill_mid_trial(procs, open_study, log_paths)
        for p in procs:
            if p is not victim:
                assert p.wait(timeout=420) == 0, (tmp_path / f"w{procs.index(p)}.out").read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for fh in logs:
            fh.close()
    return shared, procs.index(victim), killed


def _check_sweep(study, shared: Path, tmp_path: Path, n: int, workers: int, victim: int, killed: list[int]) -> None:
    trials = study.get_trials()
    retries = _check_exact(trials, n, {"alone:m0", "alone:m1", "textbook"})
    assert set(killed) <= set(retries)  # the trial that was running when its worker was killed: failed, retried
    for k in killed:
        assert trials[k].state == TrialState.FAIL and retries[k].state == TrialState.COMPLETE
        assert _pid(retries[k]) != _pid(trials[k])  # ... by another worker
    records = [json.loads((tmp_path / f"w{i}" / f"worker-{i}.json").read_text()) for i in range(workers) if i != victim]
    assert sum(r["exported"] for r in records) == 1  # exactly one final evaluation and export
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["trials"]["finished"] == n and summary["cluster"]["exported_by"] in [r["worker"] for r in records]
    assert (shared / "best" / "recipe.yaml").is_file() and (shared / "best" / "model" / "config.json").is_file()
    assert [t for t in trials if t.state == TrialState.COMPLETE and "fitness" not in t.user_attrs] == []
    final = study._storage.get_study_system_attrs(study._study_id)["evomerge:final"]  # noqa: SLF001
    assert final["done"] and final["dir"] == str(shared)
    dead = _pid(trials[killed[0]])
    ran = [x for r in records for x in r["trials_run"]]
    assert sorted(ran) == sorted(t.number for t in trials if _pid(t) not in (None, dead))  # every start accounted for


@pytest.mark.slow
def test_postgres_three_workers_one_killed_mid_trial(pg, fam, tmp_path):
    url = pg.create_database("sweep")
    env = {**os.environ, "EVOMERGE_STORAGE_URL": url, "HYDRA_FULL_ERROR": "0"}
    n = 24  # see the journal test
    shared, victim, killed = _run_sweep(fam, tmp_path, n, 3, ["storage=postgres"], env,
                                        lambda: optuna.load_study(study_name=STUDY, storage=url))
    study = optuna.load_study(study_name=STUDY, storage=url)
    _check_sweep(study, shared, tmp_path, n, 3, victim, killed)
    # evomerge-export from anywhere that reaches the database: the shared folder's manifest names it
    out = tmp_path / "elsewhere" / "winner"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "evomerge.export.cli", str(shared), "--out", str(out), "--recipe-only"],
                          cwd=out.parent, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "recipe.yaml").read_text().split("\n", 1)[1] == (shared / "best/recipe.yaml").read_text().split("\n", 1)[1]
    # the password is in no output, log, summary or config the sweep wrote
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert PASSWORD.encode() not in path.read_bytes(), path
    survivor = next(i for i in range(3) if i != victim)  # (a SIGKILLed worker's buffered output is lost)
    assert "***" in (tmp_path / f"w{survivor}.out").read_text()


@pytest.mark.slow
def test_a_password_on_the_command_line_reaches_no_file_or_message(pg, fam, tmp_path):
    """The README's URL form (plain postgresql://, which SQLAlchemy 2.1 reads as psycopg 3) works with what
    [cluster] installs, and a password written into storage.url is masked in every file the run leaves."""
    url = pg.create_database("cmdline").replace("postgresql+psycopg2://", "postgresql://")
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_STORAGE_URL"}
    proc = subprocess.run([*APP, *_args(fam, 4, "storage=postgres", f"storage.url={url}", "worker=0"),
                           f"hydra.run.dir={tmp_path / 'run'}", f"cluster.dir={tmp_path / 'shared'}"],
                          capture_output=True, text=True, env={**env, "HYDRA_FULL_ERROR": "0"}, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PASSWORD not in proc.stdout + proc.stderr and "storage.url holds a password" in proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in written) and any(p.name == "summary.json" for p in written)
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_journal_two_workers_one_killed_mid_trial(fam, tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    n = 24  # enough that the second worker joins before the first has run them all, on a loaded machine too
    path = tmp_path / "shared" / "study.journal"
    shared, victim, killed = _run_sweep(fam, tmp_path, n, 2, ["storage=journal"], env,
                                        lambda: optuna.load_study(study_name=STUDY, storage=_journal(path)))
    study = optuna.load_study(study_name=STUDY, storage=_journal(path))
    _check_sweep(study, shared, tmp_path, n, 2, victim, killed)


@pytest.mark.slow
def test_submitit_local_two_workers(fam, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([*APP, "-m", *_args(fam, 6, "storage=journal", "sampler=random"), "worker=range(2)",
                           "hydra/launcher=local", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=_journal(sweep / "study.journal"))
    _check_exact(study.get_trials(), 6, {"alone:m0", "alone:m1", "textbook"})
    records = [json.loads((sweep / str(i) / f"worker-{i}.json").read_text()) for i in range(2)]
    assert sum(r["exported"] for r in records) == 1 and (sweep / "best" / "recipe.yaml").is_file()
    # Every trial was run by exactly one of the two workers. That both took part is not asserted: on a loaded
    # machine the second can start after the first has spent the budget, and then rightly runs none (the
    # overlapping sweeps above order their workers to test that).
    ran = [x for r in records for x in r["trials_run"]]
    assert sorted(ran) == [t.number for t in study.get_trials()]


def test_postgres_without_a_url_is_one_clear_error(fam, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_STORAGE_URL"}
    start = time.perf_counter()
    proc = subprocess.run([*APP, *_args(fam, 4, "storage=postgres"), f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "evomerge: error:" in proc.stderr and "EVOMERGE_STORAGE_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 60


def test_slurm_launcher_config_makes_a_gpu_job_script(tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` composes over the submitit plugin and becomes the sbatch script SLURM gets
    (the plugin's parameter mapping, submitit's script writer; only ``sbatch`` itself is missing here)."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from evomerge.run.app import _conf_dir

    with initialize_config_dir(config_dir=_conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["+search=ties_math", "storage=postgres", "worker=0", "hydra/launcher=slurm",
                                 "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params["_target_"].endswith("SlurmLauncher") and params["gpus_per_task"] == 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexec \"$@\"\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "sub", slurm_max_num_timeout=params["max_num_timeout"])
    executor.update_parameters(**{(k if k in base else f"slurm_{k}"): v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout", "name")})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")  # noqa: SLF001
    for flag in ("--partition=gpu", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=64GB", "--time=90",
                 "--ntasks-per-node=1", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
