"""Handlers MONAI lacks (every other handler in the bundles is MONAI's or ignite's)."""

from tsdk_monai.handlers.teacher_saver import TeacherSaver, latest_checkpoint

__all__ = ["TeacherSaver", "latest_checkpoint"]
