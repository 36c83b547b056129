"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # tests run many tiny ops: intra-op threads only add synchronisation, and on a
    # 2-core machine shared with other processes oversubscribed OpenMP threads stall
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
