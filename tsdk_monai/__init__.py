"""tsdk-monai: task-specific knowledge distillation from vision foundation models, as MONAI bundles."""

__version__ = "0.1.0"

__all__ = ["__version__"]
