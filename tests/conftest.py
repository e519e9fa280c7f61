import pytest
import torch

import lora_ops  # noqa: F401  (registers the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and lora_ops.cuda_built() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
