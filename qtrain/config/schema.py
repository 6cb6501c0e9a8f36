"""The recipe schema: one dataclass per section, the single source of truth for every knob.

Field defaults are what a recipe gets when it leaves a key out. Value checks that
involve more than one field live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from qtrain.config.methods import PeftMethod


@dataclass
class ModelConfig:
    """Where the base model comes from.

    Exactly one of `path` (a local Hugging Face model dir) or `from_config` (a transformers
    config dict, random init from the recipe's seed) must be set.
    """

    path: Optional[str] = None
    from_config: Optional[dict[str, Any]] = None
    # Tokenizer dir; defaults to `path`. Required with `from_config`.
    tokenizer: Optional[str] = None
    # Where a `from_config` base is written as a normal HF dir; default <output_dir>/base.
    base_dir: Optional[str] = None
    # Compute dtype of the unquantized weights and of NF4 dequantization. auto: bf16 where the device
    # computes it natively (CUDA >= 8.0, CPUs with AVX-512 BF16 or AMX), fp16 with loss scaling on older
    # GPUs, fp32 on other CPUs (see qtrain/models/precision.py).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False


@dataclass
class QuantConfig:
    method: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    blocksize: int = 64


@dataclass
class PeftConfig:
    """How the base is adapted. Keys are flat; each method reads only its own (config/methods.py),
    and a key set explicitly for a method that does not read it is an error."""

    # lora | dora | ia3 | prompt_tuning | prefix_tuning | bottleneck | compacter | bitfit | freeze |
    # diff_pruning | full (docs/methods.md); full trains every weight and needs quant.method: none.
    method: PeftMethod = "lora"
    # LoRA / DoRA: rank, scale alpha / r (rsLoRA: alpha / sqrt(r)), dropout on the adapter's input.
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    # Which linear layers: `auto` (the architecture's default for the method), `all-linear` (every
    # linear but the output head), a list of name suffixes (`q_proj` matches `...self_attn.q_proj`),
    # or a string regex that must match the whole module name (PEFT's convention).
    targets: Union[list[str], str] = "auto"
    # (IA)^3: targets whose *input* is scaled (the FFN's output projection); `auto` = the architecture's.
    feedforward_targets: Union[list[str], str] = "auto"
    # Prompt / prefix tuning: virtual tokens per sequence (per layer for prefix tuning).
    num_virtual_tokens: int = 20
    # Prompt tuning init: embeddings of tokens sampled from the vocabulary, of a text, or random
    # (normal with the embedding matrix's own std).
    prompt_init: Literal["vocab", "text", "random"] = "vocab"
    prompt_init_text: Optional[str] = None
    # Prefix tuning: train the prefixes through a two-layer MLP (Li & Liang), folded away at save.
    prefix_projection: bool = True
    prefix_hidden_size: Optional[int] = None  # the MLP's width; default: the model's hidden size
    # Bottleneck adapters / compacter: bottleneck width = hidden / reduction_factor.
    reduction_factor: int = 16
    # houlsby: after attention and after the FFN; pfeiffer: after the FFN; parallel: beside the FFN.
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    # Compacter: n Kronecker products per weight (the n x n rules are shared by all adapters), rank
    # of each per-layer factor.
    phm_dim: int = 4
    phm_rank: int = 1
    # Layer freezing: train the top K blocks in full precision (or blocks [start, end) of the
    # output-side stack); everything else stays frozen (and NF4).
    layers_to_train: int = 1
    layer_range: Optional[list[int]] = None
    # Diff pruning: fraction of the delta that is zero in the saved artifact, and the weight of the
    # hard-concrete L0 penalty (on the expected density above 1 - target_sparsity).
    target_sparsity: float = 0.99
    l0_weight: float = 1.0

    # The keys the recipe set explicitly (recorded by the typed builder; empty when built in code).
    explicit_keys: ClassVar[frozenset] = frozenset()


@dataclass
class MixSource:
    """One source of a data mixture: its file(s) and how often training draws from it."""

    # A file, a glob (`shards/*.jsonl`) or a list of either.
    path: Union[str, list[str]] = ""
    # Relative weight: a source is drawn with probability weight / (sum of weights).
    weight: float = 1.0


@dataclass
class DataConfig:
    # A file, a glob (`data/*.jsonl`) or a list of either; the files are read in order as one source.
    path: Union[str, list[str], None] = None
    # Instead of `path`: several sources sampled by weight, deterministically by seed.
    mix: Optional[list[MixSource]] = None
    format: Literal["text", "instruction", "chat", "summarization"] = "instruction"
    max_len: int = 512
    # Bin-pack whole rows into sequences of up to max_len tokens; rows never attend to each other.
    packing: bool = True
    # Flatten each micro-batch into one row with per-row position ids instead of padding it.
    # auto: where attention stays per row (flash-attention varlen); true: always (decoder-only); false: pad.
    padding_free: Union[Literal["auto"], bool] = "auto"
    # What to do with a row longer than max_len: cut it, or leave it out (and count it).
    overlong: Literal["truncate", "drop"] = "truncate"
    eval_split: float = 0.05
    eval_path: Optional[str] = None
    # Rename the fields a format reads, e.g. {prompt: instruction, response: output}.
    fields: dict[str, str] = field(default_factory=dict)
    # Where tokenized data is cached (memory-mapped Arrow); default <output_dir>/data_cache.
    cache_dir: Optional[str] = None
    # Rebuild the cache even if a valid one exists.
    rebuild: bool = False
    # Processes that tokenize; default: the CPU cores this process may use (a cache build runs
    # while the other ranks wait), shared among a node's ranks when streaming.
    num_proc: Optional[int] = None
    # Encode and pack rows on the fly while training (no cache); needs eval_path or eval_split: 0.
    streaming: bool = False


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    max_steps: int = 1000
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "paged_adamw_8bit"
    grad_clip: Optional[float] = 1.0
    gradient_checkpointing: bool = True
    # With checkpointing: what backward recomputes (see qtrain/peft/recompute.py). auto: the fastest
    # mode whose planned extra memory fits in half of what `full` leaves free (qtrain/plan/recompute_choice.py).
    recompute: Literal["auto", "full", "mlp", "attention", "matmuls"] = "auto"
    # Autocast around forward/backward. auto: in the compute dtype when it is 16-bit (bf16, or fp16 with
    # loss scaling), none for fp32; on: also bf16 autocast over fp32 weights; off: never.
    autocast: Literal["auto", "on", "off"] = "auto"
    # On a NaN/inf loss or gradient norm: skip the step (stop after max_nonfinite_in_row in a
    # row) or stop at once; either way the last good state is checkpointed before stopping.
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_in_row: int = 3
    # torch.use_deterministic_algorithms(True): bit-reproducible runs (fixed threads on CPU).
    deterministic: bool = False
    eval_every_steps: int = 0
    eval_batches: Optional[int] = None
    num_threads: Optional[int] = None
    # Torch's allocator for CPU tensors. auto: qtrain's caching allocator (large blocks reused from
    # step to step instead of fragmenting glibc's heap; kernels/qtrain_kernels/host_cache.cpp, built
    # on first use with the system's C++ compiler) when the model computes on the CPU, else the
    # system's; caching: always (an error where it cannot be built); system: never.
    host_allocator: Literal["auto", "caching", "system"] = "auto"


@dataclass
class DistributedConfig:
    # auto: DeepSpeed if deepspeed_config is set, else DDP when launched with several processes
    # (torchrun), else plain. fsdp: torch FSDP2, sharding the 4-bit base, the unquantized weights
    # and the adapter across processes (launched by torchrun).
    engine: Literal["auto", "plain", "ddp", "fsdp", "deepspeed"] = "auto"
    # A DeepSpeed JSON with ZeRO settings (configs/deepspeed/zero{1,2,3}.json); batch sizes,
    # accumulation, clipping and precision come from the recipe (a conflicting value is an error).
    deepspeed_config: Optional[str] = None
    # A collective that waits longer than this fails the job (a crashed rank never hangs the rest).
    timeout_s: float = 300.0


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    keep: int = 3
    # auto: continue from the newest intact checkpoint in output_dir (if any); never: start over;
    # step-N: exactly that checkpoint.
    resume: str = "auto"


@dataclass
class LoggingConfig:
    every_steps: int = 10
    # Event files under <output_dir>/tensorboard (needs the `tensorboard` package).
    tensorboard: bool = False
    # Weights & Biases (needs `wandb`): offline unless wandb_mode is online or WANDB_MODE says so.
    wandb: bool = False
    wandb_project: str = "qtrain"
    wandb_mode: Literal["offline", "online"] = "offline"
    # A progress bar on a terminal, one line per logged step otherwise (e.g. SLURM logs).
    progress: bool = True


@dataclass
class CompareConfig:
    """`qtrain compare RECIPE`: which variants run on the recipe's data and budget, and how they are scored."""

    # base: the untouched base; a method name (lora, ia3, prompt_tuning, ...): that method on the
    # recipe's quant.method base; METHOD@nf4 / METHOD@none: on that base. qlora = lora@nf4.
    variants: list[str] = field(default_factory=lambda: ["base", "full", "lora@none", "lora@nf4"])
    # Per-method learning rates, e.g. {prompt_tuning: 3.0e-2}; default: train.lr.
    method_lr: dict[str, float] = field(default_factory=dict)
    # Learning rate of full fine-tuning (every weight moves, so it usually wants a smaller one):
    # the same as method_lr: {full: ...}, which wins if both are set.
    full_lr: Optional[float] = None
    # Eval rows to generate summaries/answers for (ROUGE); null = the whole eval split.
    max_gen_rows: Optional[int] = 100
    max_new_tokens: int = 64

    # The keys the recipe set explicitly (a recipe naming variants configures those methods too).
    explicit_keys: ClassVar[frozenset] = frozenset()

    def learning_rate(self, method: str, default: float) -> float:
        rates = {"full": self.full_lr} if self.full_lr is not None else {}
        return {**rates, **self.method_lr}.get(method, default)


@dataclass
class Recipe:
    output_dir: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    kernels: Literal["auto", "triton", "torch"] = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
