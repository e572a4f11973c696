"""Shared fixtures: one tiny tokenizer and one tiny model directory per test session (built offline).

- `tiny_model_dir`: a Hugging Face model directory (tiny Llama, safetensors, tokenizer with a ChatML-like chat
  template; pad `<|pad|>` != eos `<|im_end|>`). Treat it as read-only; copy it if a test must modify it.
- `tiny_tokenizer`: the tokenizer loaded from that directory (shared, do not mutate; `copy.deepcopy` it first).
- `prefect_api`: the API URL of Prefect's test server (`prefect_test_harness`), one per session, shared by every
  module that runs flows against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.tiny import create_tiny_base

# Tiny models gain nothing from intra-op threads, and on a shared 2-core CI box extra threads only contend
# (measured: ~10x slower steps under load); results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_base(tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    # Imported here: most test modules never start a flow.
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
