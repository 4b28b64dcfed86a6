"""Benchmark: the full method table on PSFHS, the hard multi-class development set (issue 14).

PSFHS (Chen et al. 2024, CC BY 4.0; ``../shared/data/psfhs``, see its SOURCE.md): 1358 intrapartum transperineal
ultrasound images at 256x256, two classes: the pubic symphysis (~2.5% of the pixels, a thin, low-contrast structure
at the image border) and the fetal head (large, with a shadowed, partly missing boundary). Speckle, shadowing and a
fan-shaped field of view; no patient ids, so the split groups blocks of 10 consecutive image ids.

Same code path and schedules as ``bench/hc18_table.py`` (``tsdk run --preset cpu|full|smoke``):

    python bench/psfhs_table.py                   # CPU schedule, 20 and 80 labels, seed 0
    python bench/psfhs_table.py --seeds 0,1,2     # three seeds: mean ± std and TS-KD's paired bootstrap intervals
    python bench/psfhs_table.py --data DIR        # a copy elsewhere (images/ and labels/)

Measured (2026-12-07, evening: today's CPU schedule, whose baselines (scratch, task-agnostic KD, MAE, MoCo v3) fine-tune
twice as long as the distilled students, chosen on validation; the afternoon's table below with those 24 fine-tunings
run again, ~114 stage minutes), test Dice 20 / 80 labels, mean of the 3 fine-tunings: teacher 0.824 / 0.871 (its
post-processing chosen on validation, teacher bundle 0.5), scratch 0.769 / 0.800, task-agnostic KD 0.734 / 0.789,
MAE 0.738 / 0.784, MoCo v3 0.750 / 0.789, TS-KD without synthesis 0.844 / 0.881, TS-KD 0.847 / 0.873 (TS-KD minus
scratch +0.078 [+0.065, +0.092] / +0.074 [+0.063, +0.085]). A fresh run of this command into an empty ``--work``
folder gave the same table to the last digit in 124.6 stage minutes (126.7 wall; ~3 of them another job's). A second
fresh run the same night gave the same metrics again for the 19 evaluations it reached, but the same stages took 0.7x
to 1.6x as long as in the first (the VM's speed drifts): at the afternoon's speed the table is ~103 stage minutes.

Afternoon (2026-12-07, the CPU schedule then: the teacher's LoRA of rank 16 on every encoder linear layer, 480
iterations with a cosine decay, bfloat16, 4 distillation epochs, TS-KD fine-tuned at 3e-4, every student fine-tuned
with 3 seeds; seed 0; ~118 stage minutes on 2 cores), test Dice 20 / 80 labels, mean of the 3 fine-tunings: teacher
0.817 / 0.870, scratch 0.738 / 0.757, task-agnostic KD 0.730 / 0.751, MAE 0.705 / 0.757, MoCo v3 0.728 / 0.755, TS-KD
without synthesis 0.843 / 0.879, TS-KD 0.848 / 0.872 (the README's PSFHS table has the std, HD95 and intervals).
The same students evaluated again with student bundle 0.5's post-processing choice (lowest validation HD95 within
0.005 Dice; with this version's fast argmax the table takes ~105 stage minutes, estimated): 0.817 / 0.870 (no
post-processing), 0.735 / 0.755, 0.728 / 0.751, 0.704 / 0.754, 0.726 / 0.752, 0.844 / 0.881, 0.847 / 0.873; TS-KD's
HD95 12.3 / 10.3 px instead of 13.7 / 11.6.
With one fine-tuning (74.1 stage minutes): 0.817 / 0.870, 0.747 / 0.762, 0.734 / 0.766, 0.691 / 0.750, 0.729 /
0.764, 0.842 / 0.876, 0.847 / 0.874. Earlier schedules, same order: 2026-12-07 morning (LoRA of rank
4 on qkv) 0.780 / 0.830, baselines the same, 0.833 / 0.853, 0.825 / 0.858; 2026-12-06 (the teacher 160 iterations at
a constant 1e-3) 0.745 / 0.791, 0.747 / 0.762, 0.734 / 0.766, 0.691 / 0.750, 0.729 / 0.764, 0.799 / 0.834, 0.809 /
0.843; 2026-12-04 (float32, 2 distillation epochs) teacher 0.757 / 0.800, scratch 0.726 / 0.777, TS-KD 0.800 / 0.821.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hc18_table import main as table_main  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    return table_main(["--dataset", "psfhs", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
