"""Classical baselines: the Dark Channel Prior."""
from .dcp import DarkChannelPrior, dehaze_dcp
