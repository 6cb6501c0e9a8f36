"""Compile every Triton kernel for a CUDA target on a machine without a GPU (ptxas ships with triton).

    python tests/kernels/cuda_compile_probe.py [ARCH ...]     # default: 80 90; prints one JSON line

The interpreter runs the kernels' semantics on CPU but accepts programs that a GPU compile
rejects (tl.dot shapes, dtype mixes, layouts); this catches those, and reports registers and
spills per variant from the cubin. Must run without TRITON_INTERPRET (it needs real JIT objects),
which is why test_cuda_compile.py starts it in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

from qtrain_kernels.triton import fused_ce, gemv_nf4, lora_matmul, nf4_dequant

NF4 = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "offset_ptr": "*fp32",
       "code_ptr": "*fp32", "lut_ptr": "*fp32"}


def _sig(fn, types: dict, consts: dict) -> tuple[dict, dict]:
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    return sig, consts


def variants() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature types, constexprs, launch options): every code path, with the tile
    sizes and stages the launchers would really pick on a GPU (their `_blocks` heuristics)."""
    out = []
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        prec = "ieee" if dt == "fp32" else "tf32"
        for aligned in (True, False):
            common = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, PRECISION=prec)
            fwd_t = {"x_ptr": f"*{dt}", **NF4, "bias_ptr": f"*{dt}", "xa_ptr": f"*{dt}", "b_ptr": f"*{dt}",
                     "y_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32",
                     "stride_xm": "i32", "stride_xk": "i32"}
            dx_t = {"g_ptr": f"*{dt}", **NF4, "gb_ptr": f"*{dt}", "a_ptr": f"*{dt}", "mask_ptr": "*u8",
                    "dx_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32",
                    "stride_gm": "i32", "stride_gn": "i32"}
            for m in (33, 2048):
                cfg = lora_matmul._blocks(m, 64, torch_dt, aligned)
                opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
                row_aligned = aligned and cfg["BK"] % 64 == 0
                c = dict(common, ROW_ALIGNED=row_aligned, BR=16, GROUP=8, **cfg)
                out.append((f"fwd_{dt}_al{aligned:d}_m{m}", lora_matmul._fwd_kernel, fwd_t,
                            dict(c, HAS_BIAS=True, HAS_LORA=True), opts))
                out.append((f"dx_{dt}_al{aligned:d}_m{m}", lora_matmul._dx_kernel, dx_t,
                            dict(c, HAS_LORA=True, HAS_MASK=True), opts))
            cfg = gemv_nf4._blocks(torch_dt, aligned)
            opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
            gv_t = {k: v for k, v in fwd_t.items() if k != "y_ptr"}
            gv_t.update(out_ptr="*fp32", k_per_split="i32")
            c = dict(common, ROW_ALIGNED=aligned, HAS_BIAS=True, HAS_LORA=True, ATOMIC=True, BM=16, BR=64, **cfg)
            out.append((f"gemv_{dt}_al{aligned:d}", gemv_nf4._gemv_kernel, gv_t, c, opts))
        ce_t = {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "V": "i32", "stride_row": "i32",
                "ignore_index": "i32"}
        out.append((f"ce_{dt}", fused_ce._ce_kernel, ce_t, dict(BLOCK_V=4096), dict(num_warps=8)))
    for kind, dq in ((0, False), (1, True), (2, True)):
        odt = {0: "fp32", 1: "fp16", 2: "i16"}[kind]
        t = {**NF4, "absmax_ptr": "*u8" if dq else "*fp32", "out_ptr": f"*{odt}", "n": "i32", "nbytes": "i32"}
        out.append((f"dequant_kind{kind}_dq{dq:d}", nf4_dequant._dequant_kernel, t,
                    dict(BLOCKSIZE=64, DOUBLE_QUANT=dq, OUT_KIND=kind, BLOCK=1024), dict(num_warps=4)))
    return out


def resources(cubin: bytes) -> dict:
    """Registers and spill bytes of the kernel in a cubin (cuobjdump ships with triton)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}


def main(archs: list[int]) -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
    report = {}
    for arch in archs:
        for name, kernel, types, consts, opts in variants():
            sig, consts = _sig(kernel, types, consts)
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
            try:
                done = triton_compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(opts, enable_fp_fusion=name.startswith("ce")))
                report[f"sm{arch}/{name}"] = {"ok": True, "shared": done.metadata.shared,
                                              **resources(done.asm["cubin"])}
            except Exception as exc:  # noqa: BLE001 - report every failure, not only the first
                report[f"sm{arch}/{name}"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
    print(json.dumps(report))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
