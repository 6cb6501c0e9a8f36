"""Shared fixtures: the repo's quickstart tokenizer and tiny random-init base models (no hub)."""

from __future__ import annotations

import os
import sys
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


def _import_triton_for_the_interpreter() -> None:
    """On a machine without CUDA, import triton under TRITON_INTERPRET=1 before anything else does.

    `@triton.jit` picks compile or interpret when a function is decorated, triton.language's own
    helpers (tl.zeros, ...) included, at `import triton`. transformers' modeling_utils imports
    torch._dynamo, which imports triton: any test module importing qtrain.peft would fix triton.language
    in compile mode before tests/kernels/conftest.py sets the variable, and the interpreted kernels
    then fail ("Cannot call @triton.jit'd outside of the scope of a kernel"). The variable is
    restored at once so that it does not leak into the subprocesses tests start.
    """
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def pytest_configure(config):
    _import_triton_for_the_interpreter()


def pytest_collection_modifyitems(config, items):
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
