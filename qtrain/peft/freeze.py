"""Layer freezing: train the top K blocks (or a range of blocks) in full precision, freeze the rest.

Later blocks carry the task-specific part of a pretrained model, so tuning only them adapts it
(lecture: "fine-tuning the top layers only"). The trained blocks are loaded unquantized in fp32
(master weights; compute runs under the recipe's autocast) while every other linear stays NF4 and
frozen, so the memory saving of the 4-bit base holds for the frozen part. Blocks are counted in
the output-side block list of the architecture spec (T5: the decoder).

Artifact (qtrain's own format, docs/methods.md): adapter_config.json with `qtrain_method: freeze`,
`block_list` and `layer_range`; adapter_model.safetensors holds those blocks' parameters under
their Hugging Face names, in fp32. Checkpoints hold the same (resume is exact). Merging writes the
base with those blocks replaced: a full HF model dir.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.arch_spec import arch_spec, block_lists
from qtrain.errors import CheckpointError
from qtrain.peft import artifact
from qtrain.peft.holder import AdapterHolder, strip_holders
from qtrain.peft.layer import AdaptedLinear, freeze, module_device
from qtrain.peft.method import LoadOptions, Method, task_type_of
from qtrain.peft.multi_linear import MultiAdapterLinear
from qtrain.quant.linear import NF4Linear, dense_weight_fn


def block_range(model: nn.Module, cfg: PeftConfig) -> tuple[str, int, int]:
    """(block list path, start, end) of the blocks `cfg` trains, checked against the model."""
    path, blocks = block_lists(model, arch_spec(model, "layer freezing"))[-1]
    n = len(blocks)
    if cfg.layer_range is not None:
        start, end = cfg.layer_range
        if end > n:
            raise ConfigError(f"peft.layer_range: {cfg.layer_range} reaches past the model's {n} blocks in {path}; "
                              f"use [start, end) with end <= {n}")
        return path, start, end
    if cfg.layers_to_train > n:
        raise ConfigError(f"peft.layers_to_train: {cfg.layers_to_train}, but {path} has {n} blocks; use at most {n}")
    return path, n - cfg.layers_to_train, n


def trained_blocks(model: nn.Module, cfg: PeftConfig) -> list[str]:
    path, start, end = block_range(model, cfg)
    return [f"{path}.{i}" for i in range(start, end)]


def _under(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


class Freeze(Method):
    name = "freeze"

    def load_options(self, cfg: PeftConfig, dtype: torch.dtype, quantize: bool) -> LoadOptions:
        return LoadOptions(dtype, quantize, dense=lambda skeleton: trained_blocks(skeleton, cfg))

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        freeze(model)
        blocks = trained_blocks(model, cfg)
        for block in blocks:
            for p in model.get_submodule(block).parameters():
                if p.dtype != torch.float32:  # loaded without the method's load options
                    p.data = p.data.float()
                p.requires_grad_(True)
        return blocks

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"layer freezing: {len(names)} top block(s) trained in fp32 ({', '.join(names)})"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        blocks = trained_blocks_of(model)
        return {n: p for n, p in model.named_parameters() if _under(n, blocks)}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        path, start, end = block_range(model, cfg)
        return {"qtrain_method": self.name, "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "block_list": path, "layer_range": [start, end], "dtype": "float32"}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        start, end = config["layer_range"]
        return PeftConfig(method=self.name, layer_range=[int(start), int(end)])

    def attach(self, model: nn.Module, name: str, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
               source: str) -> None:
        """Load the saved blocks into dense copies of the model's, in its dtype, and swap them in when current."""
        path, start, end = block_range(model, cfg)
        blocks: nn.ModuleList = model.get_submodule(path)
        holder = getattr(model, HOLDER, None)
        if holder is None:
            holder = FreezeBlocks(blocks)
            model.add_module(HOLDER, holder)
        dtype = model.get_input_embeddings().weight.dtype
        built = {i: dense_copy(holder.originals[str(i)] if str(i) in holder.originals else blocks[i])
                 for i in range(start, end)}
        params = {f"{path}.{i}.{n}": p for i, b in built.items() for n, p in b.named_parameters()}
        try:
            artifact.load_named(params, tensors, what="trained block parameter")
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        holder.add(name, {i: b.to(dtype).requires_grad_(False) for i, b in built.items()})


HOLDER = "freeze_blocks"


def trained_blocks_of(model: nn.Module) -> list[str]:
    """The blocks whose parameters train (what `inject` made trainable), from the model itself."""
    spec = arch_spec(model, "layer freezing")
    out = []
    for path, blocks in block_lists(model, spec):
        out += [f"{path}.{i}" for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    return out


def dense_copy(block: nn.Module) -> nn.Module:
    """A copy of `block` whose linears (NF4, adapter holders or training layers) are plain fp32 nn.Linears
    holding the frozen base weights: the skeleton a saved layer-freezing adapter is loaded into."""
    block = copy.deepcopy(block)
    strip_holders(block, keep=(MultiAdapterLinear,))  # other adapters' parallel holders, with their hooks
    replaced: list[str] = []
    for name, mod in list(block.named_modules()):
        if not name or any(name.startswith(r + ".") for r in replaced):
            continue
        if isinstance(mod, (NF4Linear, AdaptedLinear, MultiAdapterLinear)):
            base = getattr(mod, "base_layer", mod)
            bias = getattr(base, "bias", None)
            dense = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=module_device(base))
            with torch.no_grad():
                dense.weight.copy_(dense_weight_fn(base)(torch.float32))
                if bias is not None:
                    dense.bias.copy_(bias.float())
            block.set_submodule(name, dense)
            replaced.append(name)
    return block


class FreezeBlocks(nn.Module, AdapterHolder):
    """Saved layer-freezing adapters of an inference model: per adapter, replacement blocks for one block
    list; whichever adapter is current has its blocks swapped into the model (the base's are kept here)."""

    kind = "layer-freezing"

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.originals = nn.ModuleDict()
        self.active, self.enabled, self.merged = None, True, None
        self.__dict__["blocks"] = blocks  # the model's own list (registered there, not here)

    def add(self, name: str, replacements: dict[int, nn.Module]) -> None:
        for i in replacements:
            if str(i) not in self.originals:
                self.originals[str(i)] = self.blocks[i]
        self.adapters[name] = nn.ModuleDict({str(i): b for i, b in replacements.items()})
        self._swap()

    def remove(self, name: str) -> None:
        AdapterHolder.remove(self, name)
        self._swap()

    def set_active(self, name) -> None:
        self.active = name
        self._swap()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self._swap()

    def set_route(self, rows, method: str = "auto") -> None:
        AdapterHolder.set_route(self, rows, method)
        self._swap()

    def merge(self, name: str) -> None:
        self.merged = name  # the adapter's blocks are the merged weights, already in place

    def _swap(self) -> None:
        current = self.current()
        chosen = self.adapters[current] if current in self.adapters else {}
        for i, original in self.originals.items():
            self.blocks[int(i)] = chosen[i] if i in chosen else original
