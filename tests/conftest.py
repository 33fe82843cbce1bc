"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture
def one_thread():
    """One intra-op torch thread: tiny models run several times faster on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
