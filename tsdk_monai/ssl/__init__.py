"""Self-supervised pre-training baselines of the students on the transfer set: MAE and MoCo v3.

- :mod:`~tsdk_monai.ssl.mae`: masked image modelling (masked 16x16 patches reconstructed by the whole student);
- :mod:`~tsdk_monai.ssl.mocov3`: MoCo v3 (momentum encoder, symmetric InfoNCE on two augmented views);
- :mod:`~tsdk_monai.ssl.trainer`: what MONAI's ``SupervisedTrainer`` needs for them (:class:`SSLPrepareBatch`,
  :class:`ObjectiveLoss`), :func:`build_ssl_model` (by method name) and :func:`save_pretrained_student` (the
  ``tsdk_student`` bundle's ``init_ckpt``).

The ``tsdk_ssl`` bundle wires them; the pre-trained student is then fine-tuned like every other initialisation.
"""

from tsdk_monai.ssl.mae import (
    MaskedAutoencoder,
    MaskedReconstructionLoss,
    PatchMasker,
    build_reconstruction_student,
    random_patch_mask,
)
from tsdk_monai.ssl.method import SSL_METHODS, check_method_state, method_state
from tsdk_monai.ssl.mocov3 import InfoNCELoss, MLPHead, MoCoV3, concat_all_gather
from tsdk_monai.ssl.trainer import ObjectiveLoss, SSLPrepareBatch, build_ssl_model, save_pretrained_student

__all__ = [
    "MaskedAutoencoder", "MaskedReconstructionLoss", "PatchMasker", "build_reconstruction_student",
    "random_patch_mask",
    "InfoNCELoss", "MLPHead", "MoCoV3", "concat_all_gather",
    "SSL_METHODS", "ObjectiveLoss", "SSLPrepareBatch", "build_ssl_model", "check_method_state", "method_state",
    "save_pretrained_student",
]
