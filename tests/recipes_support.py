"""Shared fixtures of the recipe tests (imported by tests/test_recipes_*.py)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: intra-op threads only add synchronisation (and spin badly on a loaded machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
