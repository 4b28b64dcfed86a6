import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import HC18  # noqa: E402


@pytest.fixture(scope="session")
def demo_datalist(tmp_path_factory) -> Path:
    """A tiny demo data set (24 phantoms, 64x64, 6 labelled) shared by the tests of every bundle."""
    from tsdk_monai.data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", n=24, size=64, n_labeled=6)


@pytest.fixture(scope="session")
def hc18() -> Path:
    if not (HC18 / "images").is_dir():
        pytest.skip(f"HC18 data not found at {HC18} (it lives in ../shared beside the checkout; CI always has it)")
    return HC18


@pytest.fixture(scope="session")
def exported_bundle(demo_datalist, tmp_path_factory) -> Path:
    """A ``tsdk run`` of the scratch student on the demo data (tiny schedule), exported with ``tsdk export``: the
    zoo-ready bundle folder (its zip beside it) that the export, sharing and MONAI Label tests use as they are."""
    from tsdk_monai.cli import main
    from tsdk_monai.driver import Schedule, run_methods

    work = tmp_path_factory.mktemp("export_run")
    tiny = Schedule(student_size=64, student_epochs=2, batch_size=3, keep_aspect=True)  # exported with its geometry
    run_methods(demo_datalist, work, ["scratch"], tiny, n_labeled=6, seeds=0)
    out = work / "zoo"
    main(["export", str(work), str(out), "--method", "scratch", "--n_labeled", "6", "--seed", "0", "--version", "1.0.0",
          "--data_licence", "synthetic demo phantoms (no licence needed)"])
    return out / "tsdk_scratch_unet_small"
