"""Suite-wide test settings.

One torch thread: on the shared 2-core CI machine, small-model tests run many times
faster single-threaded than with intra-op threads competing with each other.
wandb is real but offline and silent in every test.
"""

import os

import pytest
import torch
from hypothesis import settings

# property tests draw the same examples on every run: CI never fails on a new random draw
# (run `pytest --hypothesis-profile=explore` to search afresh)
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
