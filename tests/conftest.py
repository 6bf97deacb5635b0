import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
# Copies of the official key/shape manifests and tiny configs (data, kept with the tests so a clone is enough).
REFERENCE_DIR = REPO / "tests" / "reference"

# One intra-op thread: the tiny test networks are dominated by thread-sync overhead with more.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_dir():
    return REFERENCE_DIR
