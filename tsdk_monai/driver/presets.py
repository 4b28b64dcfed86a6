"""Named schedules of ``tsdk run --preset`` (the bench's schedules, so one flag gives the measured ones)."""

from __future__ import annotations

from typing import Any

from tsdk_monai.driver.methods import Schedule
from tsdk_monai.utils import TSDKInputError

__all__ = ["PRESETS", "schedule_of"]

#: ``tsdk run`` without ``--preset``: a long schedule at 256 px (a GPU, or patience)
DEFAULT: dict[str, Any] = dict(
    student="unet_small", student_size=256, teacher_size=256, teacher_epochs=20, teacher_batch=4,
    synth_size=128, synth_epochs=100, synth_images=500, synth_steps=50, fid_real_images=256,
    distill_epochs=50, ssl_epochs=50, student_epochs=100, batch_size=8,
)

PRESETS: dict[str, dict[str, Any]] = {
    # the whole 7-method table at 20 and 80 labels in about 2 hours on 2 CPU cores (bench/hc18_table.py's default;
    # PSFHS 2026-12-07, fresh: 124.6 stage minutes, ~103 at the afternoon's machine speed; HC18 ~99; ~5 fewer since
    # the networks infer on plain tensors and ~4 since the teacher's targets come one image per call, estimated)
    "cpu": dict(
        student="unet_small", student_size=128, teacher_size=128, teacher_epochs=24, teacher_batch=4,
        synth_size=64, synth_epochs=8, synth_images=128, synth_steps=20, fid_real_images=48,
        distill_epochs=4, ssl_epochs=1, student_epochs=8, batch_size=8, iterations_like=80,
        # every student fine-tuned with 3 seeds from its one distilled / pre-trained start (the table's mean ± std and
        # intervals average the few-label fine-tuning's noise: PSFHS, 20 labels, the scratch student's 3 fine-tunings
        # 0.747 / 0.730 / 0.737): 44 stage minutes more on PSFHS (118 in all), where 3 whole seeds would take 3 x 74
        finetune_seeds=3,
        # the teacher: 480 iterations, 5% warm-up to 1e-3, then cosine decay to 0 (validating 8 times). PSFHS
        # validation Dice (80 labels, seed 0): 0.798 (test 0.830, 12 stage minutes) vs 0.768 (test 0.791) for the
        # 160 iterations at a constant 1e-3 this preset had until bfloat16 made the steps 2.2x faster; at 160
        # iterations a decay did not pay: 0.707 at 3e-4 with 5% warm-up + cosine, 0.737 at a constant 3e-4 (the
        # bundle's default), 0.744 at 1e-3 with warm-up + cosine, 0.776 at 1e-3 constant after a 5% warm-up.
        # amp: bfloat16 autocast (AMX / AVX-512 BF16 CPUs; bench/cpu_amp.py: LiteMedSAM LoRA step 2.2x, student step 1.5x
        # faster at 128 px); PSFHS teacher at 20 labels 0.787 test Dice vs 0.786 in float32 (+0.000 [-0.003, +0.003]).
        # The time it saves pays for 4 distillation epochs instead of 2; the SSL pre-training (MAE, MoCo v3) and the
        # synthesis stay in float32.
        # LoRA of rank 16 on every linear layer of the encoder (attention qkv and proj, MLP fc1 and fc2: 0.45M more
        # trainable parameters, ~20% more time: 13 instead of 11 minutes per teacher) instead of the bundle's SAMed
        # default, rank 4 on qkv alone: PSFHS, seed 0, best validation Dice 0.777 vs 0.736 at 20 labels (test 0.817
        # vs 0.780), 0.827 vs 0.798 at 80.
        extra={"tsdk_teacher": {"learning_rate": 1e-3, "lr_warmup": 0.05, "lr_cosine_cycles": 0.5, "amp": True,
                                "lora_rank": 16, "lora_target_modules": ["qkv", "proj", "fc1", "fc2"]},
               "tsdk_distill": {"amp": True}, "tsdk_student": {"amp": True}},
        # chosen per method on the validation split (PSFHS, 20 labels, seed 0): a distilled student keeps more of what
        # it learnt when fine-tuned at 3e-4 (TS-KD without synthesis, validation Dice: float32, 2 distillation epochs
        # 0.779 vs 0.765 at 1e-3; 4 epochs at 3e-4 0.793; bfloat16, 4 epochs at 3e-4 0.800 vs 2 epochs at 1e-3 0.753),
        # every other student does better at 1e-3 (scratch 0.670 vs 0.655, MoCo v3 0.669 vs 0.646, task-agnostic KD
        # 0.647 vs 0.524, MAE 0.645 vs 0.613)
        method_extra={m: {"tsdk_student": {"learning_rate": 3e-4}} for m in ("tskd", "tskd_no_synth")},
        # the fine-tuning's length, chosen per method on the validation split too (PSFHS, seed 0, mean validation Dice
        # of 3 fine-tunings, 1x / 2x the epochs): a student from scratch or from label-free features is far from
        # converged after the distilled students' 80-96 iterations (scratch 0.671 / 0.712 at 20 labels, MoCo v3 0.663
        # / 0.699), while a distilled one does not gain (TS-KD 0.817 / 0.813, 0.848 / 0.847 at 80); 3x is better
        # still for scratch (0.730) but does not fit the 2 hours
        student_epochs_factor={m: 2 for m in ("scratch", "task_agnostic_kd", "mae", "mocov3")},
    ),
    # paper scale, for a GPU machine
    "full": dict(
        student="unet_small", student_size=256, teacher_size=256, teacher_epochs=50, teacher_batch=8,
        synth_size=128, synth_epochs=300, synth_images=1000, synth_steps=50, fid_real_images=512,
        distill_epochs=100, ssl_epochs=200, student_epochs=100, batch_size=16, iterations_like=80,
    ),
    # every stage end to end in minutes on a few dozen cases: checks the wiring, not the method
    "smoke": dict(
        student="unet_small", student_size=64, teacher_size=64, teacher_epochs=1, teacher_batch=2,
        synth_size=32, synth_epochs=1, synth_images=4, synth_steps=2, fid_real_images=8,
        distill_epochs=1, ssl_epochs=1, student_epochs=2, batch_size=4, iterations_like=None,
        extra={"tsdk_synthesis": {"network_def#block_out_channels": [16, 32, 32], "batch_size": 8},
               "tsdk_distill": {"batch_size": 4}, "tsdk_ssl": {"batch_size": 4}},
    ),
}


def schedule_of(preset: str | None = None, **overrides: Any) -> Schedule:
    """The :class:`Schedule` of ``preset`` (``cpu``, ``full``, ``smoke``; ``None``: ``tsdk run``'s defaults) with
    ``overrides`` on top; an override of ``None`` means "not given"."""
    if preset is None:
        base = DEFAULT
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise TSDKInputError(f"--preset {preset!r}: not a preset; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(Schedule.__dataclass_fields__)
    if unknown:
        raise TSDKInputError(f"not a schedule setting: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return Schedule(**{**base, **given})
