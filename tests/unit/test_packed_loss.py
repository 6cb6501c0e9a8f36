"""Packing never changes the loss: rows packed together (padded or padding-free) give each token the
loss it has alone, for Llama- and Qwen2-style models; eval loss is the same packed or not; a model
that ignores position-id packing is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from qtrain.config.schema import DataConfig
from qtrain.data import Example, build_datasets, collate
from qtrain.data.example import concat_rows
from qtrain.errors import ModelError
from qtrain.eval.perplexity import eval_loss
from qtrain.train.loss import batch_logits
from qtrain.train.packing_check import check_packed_attention, flat_batches

CPU = torch.device("cpu")
SIZES = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _tiny(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SIZES)).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _tiny(request.param)


def _rows() -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((7, 2), (5, 1), (9, 4)):
        ids = torch.randint(4, 1024, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def _token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token next-token losses of every trained position, row-major."""
    with torch.no_grad():
        logits = batch_logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


@pytest.mark.parametrize("layout", ["padded", "flat", "two packed rows padded"])
def test_packed_rows_give_every_token_its_loss_alone(model, layout):
    rows = _rows()
    alone = torch.cat([_token_losses(model, collate([r], pad_id=0)) for r in rows])
    if layout == "padded":
        batch = collate([concat_rows([(r.input_ids, r.labels) for r in rows])], pad_id=0)
    elif layout == "flat":
        batch = collate(rows, pad_id=0, flat=True)
    else:  # a packed sequence beside a shorter one: position ids and trailing padding in a [2, L] batch
        batch = collate([concat_rows([(r.input_ids, r.labels) for r in rows[:2]]), rows[2]], pad_id=0)
    assert "attention_mask" not in batch or "position_ids" in batch
    packed = _token_losses(model, batch)
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_eval_loss_is_the_same_packed_or_not_and_padding_free_or_not(tmp_path, tokenizer):
    model = _tiny("llama")
    rows = [{"prompt": f"Question {i}?\n", "response": "answer " * (1 + i % 5)} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for packing in (False, True):
        data = build_datasets(DataConfig(path=str(path), max_len=64, packing=packing, eval_split=0.5), tokenizer, 0)
        for flat in (False, True):
            results[packing, flat] = eval_loss(model, data.eval, tokenizer.pad_token_id, 4, CPU, flat=flat)
    assert results[True, False].sequences < results[False, False].sequences  # really packed
    reference = results[False, False]
    for key, result in results.items():
        assert result.tokens == reference.tokens, key
        assert result.loss == pytest.approx(reference.loss, rel=1e-5), key


class _IgnoresPositions(nn.Module):
    """A model that drops position_ids (as custom code that builds its own causal mask would)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_the_probe_passes_real_models_and_refuses_one_that_leaks_across_rows(model):
    model.train()
    check_packed_attention(model, CPU, None)
    assert model.training  # the probe runs in eval mode and gives the model back as it found it
    model.eval()
    with pytest.raises(ModelError, match="data.packing: false"):
        check_packed_attention(_IgnoresPositions(model).eval(), CPU, None)


def test_padding_free_auto_flattens_only_where_attention_stays_per_row():
    def fake(impl: str, encoder_decoder: bool = False):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl, is_encoder_decoder=encoder_decoder))

    assert not flat_batches("auto", fake("sdpa")) and not flat_batches("auto", fake("eager"))
    assert flat_batches("auto", fake("flash_attention_2"))
    assert flat_batches(True, fake("sdpa")) and not flat_batches(False, fake("flash_attention_2"))
    assert not flat_batches(True, fake("sdpa", encoder_decoder=True))
