"""The training loop shared by all methods, with checkpoints and logs."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .logger import MetricLogger, read_log
from .loop import EpochSeededDataset, Terminated, Trainer, TrainingDiverged, epoch_order
