"""The driver of ``tsdk run`` / ``tsdk demo``: it composes ``python -m monai.bundle run`` calls of the stage bundles.

It holds no method logic of its own: every stage is one bundle run with overrides, runnable by hand with the same
command (each stage's command is the first line of its log in ``W/logs``).

- :mod:`tsdk_monai.layout` (beside the driver, shared with the report): the run folder's layout (:class:`RunLayout`,
  :class:`RunDirs`);
- :mod:`~tsdk_monai.driver.launch`: how a stage's process starts (a warm forkserver, or a new process);
- :mod:`~tsdk_monai.driver.stages`: :class:`Stage` and :class:`StageRunner` (skip by hash, resume, typed errors);
- :mod:`~tsdk_monai.driver.methods`: the method graph (:func:`method_stages`) and :class:`Schedule`;
- :mod:`~tsdk_monai.driver.presets`: the named schedules of ``tsdk run --preset`` (:data:`PRESETS`);
- :mod:`~tsdk_monai.driver.run`: :func:`plan_runs`, :func:`run_methods` (``tsdk run``), :func:`run_demo`.
"""

from tsdk_monai.layout import RunDirs, RunLayout
from tsdk_monai.driver.methods import METHODS, Schedule, finetune_seed, method_stages, overlay_stages
from tsdk_monai.driver.presets import PRESETS, schedule_of
from tsdk_monai.driver.run import RunPlan, measure_networks, plan_runs, run_demo, run_methods
from tsdk_monai.driver.stages import BUNDLES_DIR, Stage, StageRunner, bundle_arg, code_digest

__all__ = [
    "RunDirs", "RunLayout", "METHODS", "Schedule", "finetune_seed", "method_stages", "overlay_stages", "PRESETS", "schedule_of", "RunPlan", "measure_networks",
    "plan_runs", "run_demo", "run_methods", "BUNDLES_DIR", "Stage", "StageRunner", "bundle_arg", "code_digest",
]
