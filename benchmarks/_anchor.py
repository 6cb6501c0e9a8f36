"""The anchor every benchmark compares against: HF transformers + peft + bitsandbytes QLoRA.

This is the documented QLoRA recipe, run as written: a 4-bit NF4 (double-quant) base loaded by
`from_pretrained`, `prepare_model_for_kbit_training` with non-reentrant gradient checkpointing,
then `get_peft_model`. `anchor_config` records exactly that, so a result file says what ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the benchmark's parent process reads anchor_config without importing torch
    import torch
    from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def anchor_config(rank: int, alpha: float, dtype: str = "bfloat16", checkpointing: bool = True) -> dict:
    """What `build_anchor` runs, spelled as the calls it makes."""
    autocast = f"under torch.autocast('cpu', {dtype})" if dtype != "float32" else "(fp32: no autocast)"
    return {
        "from_pretrained": f"AutoModelForCausalLM.from_pretrained(dir, dtype={dtype}, device_map={{'': 'cpu'}})",
        "quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": dtype},
        "prepare_model_for_kbit_training": {"use_gradient_checkpointing": checkpointing,
                                            "gradient_checkpointing_kwargs": {"use_reentrant": False}},
        "lora": {"r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": TARGETS,
                 "task_type": "CAUSAL_LM"},
        "loss": f"model(input_ids=x, labels=x).loss {autocast}",
        "notes": [
            "ran as documented; nothing had to be changed for CPU",
            "prepare_model_for_kbit_training upcasts every non-4-bit parameter (embeddings, lm_head, norms) to fp32",
            "in training bitsandbytes' CPU MatMul4Bit dequantizes to bf16 and runs a dense matmul, in forward, "
            "recompute and backward; its fused kernels-community CPU kernel (not installed) serves eval-mode inference only",
        ],
    }


def build_anchor(base_dir: Path, rank: int, alpha: float, dtype: str = "bfloat16",
                 checkpointing: bool = True) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(peft model in train mode, input_ids → mean next-token loss), computing in `dtype`."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = getattr(torch, dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=compute, quantization_config=quant,
                                                 device_map={"": "cpu"}, local_files_only=True)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast("cpu", dtype=compute) if compute != torch.float32 else contextlib.nullcontext()
        with amp:
            return model(input_ids=input_ids, labels=input_ids).loss

    return model, loss_fn
