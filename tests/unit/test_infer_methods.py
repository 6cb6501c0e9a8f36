"""Adapters of every method in one AdapterSet over one base: each loads back to its training model's logits,
they swap, LoRA / (IA)³ / prompt-tuning rows mix in one batch, and merging follows each method's math."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.errors import CheckpointError, ConfigError
from qtrain.infer.adapters import AdapterSet
from qtrain.infer.decode import generate_tokens
from qtrain.infer.load import BaseOptions
from qtrain.infer.merge import MergeOptions, merge_to_dir
from qtrain.infer.sampling import SamplingConfig
from qtrain.models.load import load_model
from qtrain.peft.method import ArtifactContext
from qtrain.peft.registry import METHODS, get_method
from qtrain.peft.sequence import model_logits
from qtrain.quant.nf4 import NF4Spec
from method_cases import TINY_PEFT, peft_config, perturb

CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
ADAPTERS = [m for m in METHODS if m != "full"]
MERGEABLE = [m for m in ADAPTERS if METHODS[m].merge_refusal is None]
EXTRA = {"bottleneck": {"placement": "parallel"}}  # the tiny cases' other placement: both kinds of holder


def _load(base_dir, quant: bool, method: str | None = None):
    dense = get_method(method).load_options(peft_config(method), torch.float32, quant).dense if method else None
    return load_model(base_dir, torch.float32, CPU, NF4Spec(64, True) if quant else None, dense=dense)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model_logits(model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    """Per method: (adapter dir, logits of the training model it was saved from) on the NF4 base."""
    root, out = tmp_path_factory.mktemp("adapters"), {}
    with torch.random.fork_rng(devices=[]):
        for seed, method in enumerate(ADAPTERS, start=1):
            torch.manual_seed(seed)
            cfg = peft_config(method, **EXTRA.get(method, {}))
            model = _load(tiny_base_dir, True, method)
            get_method(method).inject(model, cfg)
            perturb(model, seed=seed, std=0.1)
            get_method(method).save_artifact(model, ArtifactContext(cfg, str(tiny_base_dir)), root / method)
            out[method] = (str(root / method), _logits(model))
    return out


@pytest.fixture(scope="module")
def aset(tiny_base_dir, trained) -> AdapterSet:
    adapters = AdapterSet(_load(tiny_base_dir, True))
    for method, (path, _) in trained.items():
        adapters.add_adapter(method, path)
    return adapters


def test_every_method_loads_back_to_its_training_logits_and_they_swap(aset, trained, tiny_base_dir):
    base = _logits(_load(tiny_base_dir, True))
    assert aset.names == ADAPTERS and aset.active is None
    assert torch.equal(_logits(aset.model), base)
    for method in ADAPTERS + list(reversed(ADAPTERS)):  # there and back again: swapping leaves no trace
        aset.set_adapter(method)
        assert torch.equal(_logits(aset.model), trained[method][1]), method
    with aset.disable_adapters():
        assert torch.equal(_logits(aset.model), base)
    aset.set_adapter(None)
    assert torch.equal(_logits(aset.model), base)


def test_lora_ia3_and_prompt_rows_mix_in_one_batch_and_generation(aset, trained):
    rows = ["prompt_tuning", "lora", None]
    singles = {}
    for name in rows:
        aset.set_adapter(name)
        singles[name] = _logits(aset.model)
    aset.set_adapter(None)
    with aset.use_adapters(rows):
        mixed = _logits(aset.model)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], singles[name][i], rtol=1e-5, atol=1e-5)
    prompts, cfg = [[5, 17, 301, 44], [88, 12, 9], [7, 7]], SamplingConfig(max_new_tokens=5)
    gen_rows = ["ia3", "prompt_tuning", "lora"]
    alone = []
    for name, prompt in zip(gen_rows, prompts):
        aset.set_adapter(name)
        alone += generate_tokens(aset.model, [prompt], cfg, eos=set(), pad_id=0)
    aset.set_adapter(None)
    with aset.use_adapters(gen_rows):
        assert generate_tokens(aset.model, prompts, cfg, eos=set(), pad_id=0) == alone


@pytest.mark.parametrize("other", ["dora", "prefix_tuning", "bottleneck", "compacter", "freeze", "diff_pruning",
                                   "bitfit"])
def test_methods_that_cannot_vary_per_row_refuse_mixed_batches_but_serve_whole_ones(aset, trained, other):
    with pytest.raises(ConfigError, match="LoRA, \\(IA\\)³ and prompt tuning"):
        with aset.use_adapters([other, "lora", None]):
            pass
    with aset.use_adapters([other] * 3):  # one adapter for every row is its own path
        assert torch.equal(_logits(aset.model), trained[other][1])
    assert torch.equal(_logits(aset.model), _logits(aset.model))  # routes cleared


@pytest.fixture(scope="module")
def dense_set(tiny_base_dir, tmp_path_factory) -> tuple[AdapterSet, dict]:
    """Mergeable adapters trained on the fp32 (unquantized) base, loaded into one set over it."""
    root, refs = tmp_path_factory.mktemp("dense"), {}
    with torch.random.fork_rng(devices=[]):
        for seed, method in enumerate(MERGEABLE, start=1):
            torch.manual_seed(seed)
            cfg = peft_config(method)
            model = _load(tiny_base_dir, False, method)
            get_method(method).inject(model, cfg)
            perturb(model, seed=seed, std=0.1)
            get_method(method).save_artifact(model, ArtifactContext(cfg, str(tiny_base_dir)), root / method)
            refs[method] = (str(root / method), _logits(model))
    adapters = AdapterSet(_load(tiny_base_dir, False))
    for method, (path, _) in refs.items():
        adapters.add_adapter(method, path)
    return adapters, refs


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_follows_the_methods_math_and_unmerge_restores_the_base_exactly(dense_set, method):
    adapters, refs = dense_set
    before = {n: p.detach().clone() for n, p in adapters.model.named_parameters()}
    adapters.set_adapter(method)
    adapters.merge()
    torch.testing.assert_close(_logits(adapters.model), refs[method][1], rtol=1e-5, atol=1e-5)
    adapters.unmerge()
    adapters.set_adapter(None)  # (layer freezing's merged blocks are its swapped-in ones)
    after = dict(adapters.model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("method", [m for m in ADAPTERS if m not in MERGEABLE])
def test_methods_that_change_no_weight_refuse_to_merge_with_the_reason(aset, trained, method, tmp_path):
    aset.set_adapter(method)
    with pytest.raises(ConfigError, match=f"{method}: .*(nothing to fold|no weight|add layers)"):
        aset.merge()
    aset.set_adapter(None)
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_to_dir(MergeOptions(trained[method][0], str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["bitfit", "freeze", "dora"])
def test_qtrain_merge_writes_a_model_transformers_loads_with_the_adapters_logits(dense_set, method, tmp_path):
    from transformers import AutoModelForCausalLM

    path, expected = dense_set[1][method]
    fp32 = BaseOptions(dtype=torch.float32, quant=None)
    report = merge_to_dir(MergeOptions(path, str(tmp_path / "merged"), "fp32", base_options=fp32))
    assert report["merged_layers"] > 0 and report["probe_max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    if method == "bitfit":  # the biases BitFit gave Llama's bias-less linears are declared, so they load
        config = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert config["attention_bias"] is True and config["mlp_bias"] is True


def test_a_full_run_is_no_adapter_and_a_t5_bitfit_cannot_be_merged(tiny_t5_base_dir, tmp_path):
    with pytest.raises(CheckpointError, match="leaves a model, not an adapter"):
        METHODS["full"].attach(None, "x", peft_config("full"), {}, "somewhere")
    model = load_model(tiny_t5_base_dir, torch.float32, CPU, None)
    get_method("bitfit").inject(model, peft_config("bitfit"))
    perturb(model)
    get_method("bitfit").save_artifact(model, ArtifactContext(peft_config("bitfit"), str(tiny_t5_base_dir)),
                                       tmp_path / "a")
    with pytest.raises(ConfigError, match="t5 model's config cannot declare one"):
        merge_to_dir(MergeOptions(str(tmp_path / "a"), str(tmp_path / "m"), "fp32",
                                  base_options=BaseOptions(dtype=torch.float32, quant=None)))
    assert not (tmp_path / "m").exists() and TINY_PEFT["bitfit"] == {}
