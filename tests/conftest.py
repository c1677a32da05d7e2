from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "minicpm-v-4_5"
# CI lays ../shared beside the checkout; a user's clone does not have it: tests that need it skip with a reason.
needs_reference = pytest.mark.skipif(not REFERENCE_DIR.is_dir(), reason=f"released reference files not found at "
                                     f"{REFERENCE_DIR} (only present on the project's machines)")

# One thread: the tiny models gain nothing from more, and tests that start subprocesses (torchrun, tesseract, the
# server) would otherwise oversubscribe 2 cores, which slows small ops by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"released reference files not found at {REFERENCE_DIR}")
    return REFERENCE_DIR
