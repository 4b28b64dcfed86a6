"""Handlers MONAI lacks (every other handler in the bundles is MONAI's or ignite's)."""

from tsdk_monai.handlers.checkpoint import AtomicCheckpointSaver, CheckedCheckpointLoader
from tsdk_monai.handlers.ema_warmup import EMAWarmup
from tsdk_monai.handlers.metrics_json import MetricsJSONSaver
from tsdk_monai.handlers.postprocess import PostprocessChooser
from tsdk_monai.handlers.rank_weights import RankWeightsSaver
from tsdk_monai.handlers.teacher_saver import TeacherSaver, latest_checkpoint

__all__ = [
    "AtomicCheckpointSaver", "CheckedCheckpointLoader", "EMAWarmup", "MetricsJSONSaver", "PostprocessChooser", "RankWeightsSaver", "TeacherSaver",
    "latest_checkpoint",
]
