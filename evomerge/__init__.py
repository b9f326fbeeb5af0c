"""evomerge: evolutionary merge-optimization for language models."""
import os as _os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared machine
# (several workers, or other jobs) spinning threads starve each other; measured here, a tiny
# model's forward pass took 0.42 s with the default policy and 0.012 s with PASSIVE under load,
# and elementwise merge passes slowed 5-10x. Busy kernels keep every thread working either way.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
