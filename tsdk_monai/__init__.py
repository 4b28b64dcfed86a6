"""tsdk-monai: task-specific knowledge distillation from vision foundation models, as MONAI bundles."""

__version__ = "0.2.0"

__all__ = ["__version__"]
