import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread (two threads on a loaded two-core machine mostly wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
