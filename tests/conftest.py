"""Suite-wide test settings.

One torch thread: on the shared 2-core CI machine, small-model tests run many times
faster single-threaded than with intra-op threads competing with each other.
wandb is real but offline and silent in every test.
"""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
