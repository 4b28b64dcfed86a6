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
