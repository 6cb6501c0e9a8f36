"""LoRA-over-NF4 linear on a GPU: qtrain's fused Triton kernels vs the unfused path peft/Unsloth take.

    python -m benchmarks.bench_kernels [--ms 1,16,2048,8192 --rank 16 --modes forward,backward,full
                                        --providers ... --out benchmarks/results/<gpu>.json | --no-out]

Shapes are Llama-3-8B's projections (N×K: q/o 4096×4096, gate/up 14336×4096, down 4096×14336),
bf16 activations, NF4 double-quantized base (bitsandbytes' bytes), LoRA r=16 with fp32 A/B.
Providers, all computing y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ and its gradients (dx, dA, dB):

| provider | what runs |
|---|---|
| `qtrain_fused` | `lora_linear(..., backend="triton")`: W dequantized inside the GEMM, LoRA in the epilogue (M ≤ 16: split-K GEMV) |
| `qtrain_dequant_cublas` | qtrain's torch path on the Triton dequant kernel: dequant to bf16 → cuBLAS → addmm |
| `unfused_bnb` | the same torch path on bitsandbytes' dequant: the path peft and Unsloth take |
| `peft_bnb` | peft's LoRA layer over bitsandbytes' `Linear4bit` (the anchor's own layer) |
| `bnb_gemv` | (forward, M ≤ 16, no grad) bitsandbytes' 4-bit inference GEMV + the LoRA addmm |

Timing: `triton.testing.do_bench` (flushes L2 before every run), median and 20/80 % quantiles in
ms. `forward` runs with autograd recording (as in training), `backward` replays the same graph
(retain_graph), `full` is both; for M ≤ 16 `inference` is the forward under no_grad.
`peak_mib` is the peak allocated above the inputs during one `full` step. Without CUDA the
script exits with a message and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks._results import merge_result

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj/o_proj": (4096, 4096), "gate_proj/up_proj": (14336, 4096), "down_proj": (4096, 14336)}
PROVIDERS = ("qtrain_fused", "qtrain_dequant_cublas", "unfused_bnb", "peft_bnb", "bnb_gemv")
MODES = ("forward", "backward", "full", "inference")
DEVICE = "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1,16,2048,8192", help="token counts M, comma-separated")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {', '.join(SHAPES)}")
    p.add_argument("--modes", default="forward,backward,full,inference")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/<gpu>.json)")
    p.add_argument("--no-out", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.ms = [int(m) for m in args.ms.split(",") if m]
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    args.providers = [s for s in args.providers.split(",") if s]
    for name, given, allowed in (("shapes", args.shapes, SHAPES), ("modes", args.modes, MODES),
                                 ("providers", args.providers, PROVIDERS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def require_cuda() -> None:
    """Exit with a message (no numbers) where the benchmark cannot run."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
    for mod in ("triton", "bitsandbytes"):
        try:
            __import__(mod)
        except ImportError as exc:
            raise SystemExit(f"bench_kernels: `{mod}` does not import ({exc}); pip install {mod}") from None


def gpu_key() -> str:
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


class Layer:
    """One frozen NF4 weight (bitsandbytes' bytes) with a LoRA adapter, in every provider's form."""

    def __init__(self, n: int, k: int, rank: int, seed: int) -> None:
        import bitsandbytes.functional as bnbf
        import torch

        from qtrain_kernels.dispatch import NF4Buffers

        g = torch.Generator(device=DEVICE).manual_seed(seed)
        w = torch.randn(n, k, device=DEVICE, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        self.packed, self.state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        st = self.state
        self.nf4 = NF4Buffers(self.packed, st.absmax, (n, k), 64, st.state2.absmax, st.offset)
        self.a = (torch.randn(rank, k, device=DEVICE, generator=g) / k ** 0.5).requires_grad_(True)
        self.b = (torch.randn(n, rank, device=DEVICE, generator=g) * 0.01).requires_grad_(True)
        self.scale = 2.0  # alpha = 2r
        self.n, self.k, self.rank, self.w_bf16 = n, k, rank, w
        self._peft = None

    def bnb_weight(self, dtype):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed, self.state).to(dtype)

    def triton_weight(self, dtype):
        from qtrain_kernels.dispatch import dequantize_buffers

        return dequantize_buffers(self.nf4, dtype, backend="triton")

    def peft_layer(self):
        """peft's LoRA over a bnb Linear4bit holding the same bytes; its A/B are this layer's."""
        if self._peft is None:
            import bitsandbytes as bnb
            import torch
            from peft import LoraConfig, get_peft_model

            base = bnb.nn.Linear4bit(self.k, self.n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            base.weight = bnb.nn.Params4bit(self.packed, requires_grad=False, quant_state=self.state,
                                            bnb_quantized=True, module=base)
            holder = torch.nn.Module()
            holder.proj = base
            cfg = LoraConfig(r=self.rank, lora_alpha=self.scale * self.rank, lora_dropout=0.0, target_modules=["proj"])
            layer = get_peft_model(holder, cfg).base_model.model.proj
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(self.a)
                layer.lora_B["default"].weight.copy_(self.b)
            self._peft = layer
        return self._peft

    def forward_fn(self, provider: str):
        """x → y for `provider` (autograd-capable except bnb_gemv)."""
        import bitsandbytes as bnb
        import torch

        from qtrain_kernels.lora_linear import lora_linear

        if provider == "qtrain_fused":
            return lambda x: lora_linear(x, self.triton_weight, None, self.a, self.b, self.scale, nf4=self.nf4,
                                         backend="triton")
        if provider == "qtrain_dequant_cublas":
            return lambda x: lora_linear(x, self.triton_weight, None, self.a, self.b, self.scale)
        if provider == "unfused_bnb":
            return lambda x: lora_linear(x, self.bnb_weight, None, self.a, self.b, self.scale)
        if provider == "peft_bnb":
            return self.peft_layer()

        def gemv(x):
            y = bnb.matmul_4bit(x, self.packed.t(), quant_state=self.state)
            return torch.addmm(y, x @ self.a.to(x.dtype).t(), self.b.to(x.dtype).t(), alpha=self.scale)

        return gemv


def modes_for(provider: str, m: int, modes: list[str]) -> list[str]:
    """bnb_gemv is inference-only; inference is measured for decode sizes (M ≤ 16) only."""
    if provider == "bnb_gemv":
        return ["inference"] if m <= 16 and "inference" in modes else []
    return [mode for mode in modes if mode != "inference" or m <= 16]


def bench_one(layer: Layer, provider: str, m: int, modes: list[str]) -> list[dict]:
    import torch
    from triton.testing import do_bench

    fn = layer.forward_fn(provider)
    x = torch.randn(m, layer.k, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    gy = torch.randn(m, layer.n, device=DEVICE, dtype=torch.bfloat16)
    params = [x, layer.a, layer.b] + ([*layer.peft_layer().parameters()] if provider == "peft_bnb" else [])
    quantiles = [0.5, 0.2, 0.8]
    rows = []
    for mode in modes_for(provider, m, modes):
        if mode == "inference":
            def run():
                with torch.no_grad():
                    fn(x)
        elif mode == "forward":
            def run():
                fn(x)
        elif mode == "backward":
            y = fn(x)

            def run():
                y.backward(gy, retain_graph=True)
        else:
            def run():
                fn(x).backward(gy)
        ms = do_bench(run, grad_to_none=params, quantiles=quantiles)
        row = {"provider": provider, "m": m, "mode": mode, "ms": round(ms[0], 4), "ms_p20": round(ms[1], 4),
               "ms_p80": round(ms[2], 4)}
        if mode == "full":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        rows.append(row)
    return rows


def max_diff_vs_unfused(layer: Layer, m: int) -> float:
    """Sanity, not a test: forward of qtrain_fused vs unfused_bnb on the same input."""
    import torch

    x = torch.randn(m, layer.k, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = layer.forward_fn("qtrain_fused")(x), layer.forward_fn("unfused_bnb")(x)
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def ratios(rows: list[dict]) -> dict:
    """qtrain_fused time / unfused_bnb time per (shape, m, mode): < 1 means qtrain is faster."""
    by = {(r["shape"], r["m"], r["mode"], r["provider"]): r["ms"] for r in rows}
    out = {}
    for (shape, m, mode, prov), ms in by.items():
        base = by.get((shape, m, mode, "unfused_bnb")) or by.get((shape, m, mode, "bnb_gemv"))
        if prov == "qtrain_fused" and base:
            out[f"{shape}/m={m}/{mode}"] = round(ms / base, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda()
    import torch

    from benchmarks._harness import versions

    rows, sanity = [], {}
    for shape in args.shapes:
        n, k = SHAPES[shape]
        layer = Layer(n, k, args.rank, seed=0)
        for m in args.ms:
            sanity[f"{shape}/m={m}"] = max_diff_vs_unfused(layer, m)
            for provider in args.providers:
                for row in bench_one(layer, provider, m, args.modes):
                    rows.append({"shape": shape, "n": n, "k": k, **row})
                    print(json.dumps(rows[-1]), file=sys.stderr)
        del layer
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config": {"rank": args.rank, "dtype": "bfloat16", "nf4": "blocksize 64, double quant",
                         "timer": "triton.testing.do_bench (L2 flushed), median/p20/p80 ms"},
              "results": rows, "ratios_qtrain_fused_over_unfused": ratios(rows),
              "max_rel_diff_fused_vs_unfused": sanity, "versions": versions()}
    print(json.dumps(result, indent=2))
    if not args.no_out:
        path = args.out or REPO / "benchmarks" / "results" / f"{gpu_key()}.json"
        merge_result(path, "bench_kernels", result)


if __name__ == "__main__":
    main()
