"""tsdk-monai: task-specific knowledge distillation from vision foundation models, as MONAI bundles."""

from tsdk_monai.utils import install_excepthook as _install_excepthook

__version__ = "0.1.0"

__all__ = ["__version__"]

_install_excepthook()  # bad input ends a bundle run with one line naming the file and the problem
