"""Fixtures shared by several test modules (TRITON_INTERPRET is set in the root conftest.py)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: on tiny models extra threads only add synchronisation
    (and thrash a shared 2-core CI machine). Use with pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
