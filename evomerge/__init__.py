"""evomerge: evolutionary merge-optimization for language models."""
import os as _os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared machine
# (several workers, or other jobs) spinning threads starve each other, and a loaded machine's forward
# passes and merge passes slow by an order of magnitude (results/search_speed.md). Busy kernels keep
# every thread working either way.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
