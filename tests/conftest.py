"""Test-wide settings: nothing reaches the network, W&B stays offline, GPU tests skip without a GPU."""

from __future__ import annotations

import logging
import os

import pytest

# Set before any test imports transformers, datasets or wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("WANDB_API_KEY", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_log_handler():
    """``setup_logging`` keeps one stderr handler per process, bound to the stderr of the test that made it; a later
    test's log line would go to that test's closed capture. Each test that sets up logging gets its own."""
    yield
    from rlhf import tracking

    if tracking._log_handler is not None:
        logging.getLogger().removeHandler(tracking._log_handler)
        tracking._log_handler = None
