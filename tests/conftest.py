import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import pytest
import torch

# FISHER_TEST_THREADS runs the suite with another intra-op thread count (another summation order):
# every float comparison must hold for any of them (and any CPU / BLAS build).
torch.set_num_threads(int(os.environ.get("FISHER_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _finish_wandb():
    """Each test starts without a W&B run in progress (WandbLogger would otherwise reuse it)."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()
