"""mergekit 0.1.5 as the numerical reference of the engine tests.

mergekit lives in its own virtual environment (a reference, never a dependency of
evomerge; it is LGPL) and runs as a subprocess: the ``mergekit-yaml`` command
itself. Where it is found:

* ``$EVOMERGE_MERGEKIT_PYTHON`` — the python of a venv with mergekit 0.1.5 (``.ci/run`` creates one);
* else ``~/.venvs/mergekit-0.1.5/bin/python``.

Make one with ``python -m venv ~/.venvs/mergekit-0.1.5 && ~/.venvs/mergekit-0.1.5/bin/pip install
torch==2.13.0 mergekit==0.1.5``. Without it the tests that need it skip and say so.

Why one process for many merges (:func:`mergekit_yaml`): importing mergekit's stack costs about
10 s on this machine, the merges of tiny models milliseconds. The driver calls mergekit-yaml's own
click command once per recipe, in one interpreter, with the same arguments a shell would pass.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

VERSION = "0.1.5"
DEFAULT = Path.home() / ".venvs" / f"mergekit-{VERSION}" / "bin" / "python"

_DRIVER = r"""
import json, sys
from mergekit.scripts.run_yaml import main
for config, out, extra in json.loads(sys.argv[1]):
    main.main(args=[config, out, "--quiet", *extra], standalone_mode=False)
"""


@functools.lru_cache(maxsize=1)
def _find() -> tuple[str | None, str]:
    """(python, "") when a usable mergekit is found, else (None, why not)."""
    env = os.environ.get("EVOMERGE_MERGEKIT_PYTHON")
    python = Path(env) if env else DEFAULT
    where = "$EVOMERGE_MERGEKIT_PYTHON" if env else str(DEFAULT)
    if not python.is_file():
        return None, (f"mergekit {VERSION} reference not found ({where} does not exist); set EVOMERGE_MERGEKIT_PYTHON "
                      f"to the python of a venv with mergekit=={VERSION} (see tests/mergekit_ref.py)")
    proc = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True)
    found = proc.stdout.strip()
    if proc.returncode != 0 or found != VERSION:
        return None, f"{python} has mergekit {found or 'missing'}, the tests compare against {VERSION}"
    return str(python), ""


def require() -> str:
    """The reference python, or skip the calling test with the reason."""
    python, why = _find()
    if python is None:
        pytest.skip(why)
    return python


def mergekit_yaml(jobs: list[tuple[Path, Path]], *extra: str) -> list[Path]:
    """Run ``mergekit-yaml RECIPE OUT [extra]`` for every job (one process); return the OUT folders."""
    python = require()
    payload = json.dumps([[str(r), str(o), list(extra)] for r, o in jobs])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, "-c", _DRIVER, payload], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{proc.stderr[-4000:]}")
    return [o for _, o in jobs]


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the spacing of ``a``'s dtype at the larger magnitude of the two (0 where equal)."""
    fa, fb = a.double(), b.double()
    big = torch.maximum(fa.abs(), fb.abs()).to(a.dtype)
    spacing = (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).double()
    return (fa - fb).abs() / spacing


def scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the dtype's epsilon times the tensor's largest magnitude: the size of a
    rounding difference between two orders of the same float sums (a few units), whatever the entry."""
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) or 1.0
    return float((a.double() - b.double()).abs().max()) / (torch.finfo(a.dtype).eps * scale)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, eps_units: float = 0,
                        max_ulps: float | None = None, max_frac: float = 1.0, label: str = "") -> dict[str, float]:
    """Same names, shapes and dtypes, and values equal (``eps_units`` 0), or within ``eps_units`` of
    :func:`scaled_error`, or (``max_ulps``) within that many ulps of the stored dtype in at most
    ``max_frac`` of any tensor's entries. Returns each differing tensor's fraction of differing entries."""
    assert set(got) == set(want), f"{label}: names differ: only ours {sorted(set(got) - set(want))}, " \
                                  f"only mergekit's {sorted(set(want) - set(got))}"
    fractions = {}
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{label} {name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        if torch.equal(g, w):
            continue
        frac = fractions[name] = float((g != w).float().mean())
        diff = float((g.double() - w.double()).abs().max())
        if max_ulps is not None:
            u = float(ulps(g, w).max())
            assert u <= max_ulps and frac <= max_frac, (
                f"{label} {name}: up to {u:.1f} ulps ({diff:.3g}) apart in {frac:.2%} of entries; "
                f"allowed {max_ulps} ulps in {max_frac:.2%}")
        else:
            err = scaled_error(g, w)
            assert err <= eps_units, (f"{label} {name}: max |diff| {diff:.3g} = {err:.1f} eps x the tensor's scale, "
                                      f"in {frac:.2%} of entries; allowed {eps_units}")
    return fractions
