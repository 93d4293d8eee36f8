import os

import pytest
import torch

import lightning_vis.ops as O

CUDA = torch.cuda.is_available() and O.has_backend("cuda")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels (never in CI)")


def pytest_report_header(config):
    return [O.build_info(), f"torch threads: {torch.get_num_threads()}", f"CI: {os.environ.get('CI', '')}"]
