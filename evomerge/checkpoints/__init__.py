"""Model checkpoints: lazy readers, LoRA adapters, compatibility checks and the writer."""
from evomerge.checkpoints.reader import Checkpoint, open_checkpoint  # noqa: F401
from evomerge.checkpoints.writer import parse_dtype, write_model_dir  # noqa: F401
