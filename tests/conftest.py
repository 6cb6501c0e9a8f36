"""Shared fixtures: the repo's quickstart tokenizer and tiny random-init base models (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "data" / "quickstart" / "tokenizer"
TINY_T5 = {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


def pytest_collection_modifyitems(config, items):
    # Kernel tests first: on CPU they run Triton's interpreter, whose patching of triton.language
    # an earlier in-process test can leave unusable ("Cannot call @triton.jit'd outside of the scope
    # of a kernel" for tl.zeros, seen after the integration tests); run first they see a clean process.
    items.sort(key=lambda item: 0 if "tests/kernels/" in item.nodeid else 1)  # stable: order kept otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from qtrain.models.tokenizer import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama written in fp32 as a normal HF model dir."""
    from qtrain.models.build import write_random_base

    return write_random_base(TINY_LLAMA, tokenizer, 0, torch.float32, tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_aligned_base_dir(tmp_path_factory, tokenizer) -> Path:
    """Like tiny_base_dir, with every in_features a multiple of 64 (whole NF4 blocks per row).

    bitsandbytes 0.50.2's native CPU dequantization is wrong when a row holds a partial block
    (e.g. in_features 80 or 160: ~2.3x the quantization error); oracle comparisons against
    bitsandbytes use this model so they compare against a correct reference.
    """
    from qtrain.models.build import write_random_base

    cfg = {**TINY_LLAMA, "intermediate_size": 128}
    return write_random_base(cfg, tokenizer, 0, torch.float32, tmp_path_factory.mktemp("tiny_aligned") / "base")


@pytest.fixture(scope="session")
def tiny_t5_base_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2+2-layer gated T5 (v1.1 / FLAN-T5 style) written in fp32 as a normal HF model dir."""
    from qtrain.models.build import write_random_base

    return write_random_base(TINY_T5, tokenizer, 0, torch.float32, tmp_path_factory.mktemp("tiny_t5") / "base")
