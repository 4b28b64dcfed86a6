"""What the pre-training objectives share: their method's name in their state dict, so a resume checkpoint of another
method is refused with a clear error."""

from __future__ import annotations

from typing import Any

import torch

from tsdk_monai.utils import TSDKInputError

__all__ = ["SSL_METHODS", "method_state", "check_method_state", "MethodState"]

SSL_METHODS = ("mae", "mocov3")


def method_state(method: str) -> torch.Tensor:
    """The objectives' ``_extra_state``: the method's name as a ``uint8`` tensor (a tensor, so that the state dict
    stays all tensors for code that compares or copies it)."""
    return torch.tensor(list(method.encode("ascii")), dtype=torch.uint8)


def check_method_state(state: Any, method: str) -> None:
    """Refuse a checkpoint of another pre-training method (called by the objectives' ``set_extra_state``, i.e. when a
    resume checkpoint is loaded), before the key mismatch would make a less readable error."""
    found = bytes(state.tolist()).decode("ascii", "replace") if isinstance(state, torch.Tensor) else None
    if found is not None and found != method:
        raise TSDKInputError(
            f"the resume checkpoint was written by {found} pre-training, this run is {method}: give each method its "
            "own ckpt_dir (or delete the ssl/ checkpoints there)"
        )


class MethodState:
    """Mixin of the objectives (``nn.Module`` subclasses with a class attribute ``method``): ``_extra_state``."""

    method: str

    def get_extra_state(self) -> torch.Tensor:
        """The method's name in the state dict (``_extra_state``), so a resume checkpoint of another method is refused."""
        return method_state(self.method)

    def set_extra_state(self, state: torch.Tensor) -> None:
        check_method_state(state, self.method)
