"""Compile every Triton kernel for a Hopper GPU (sm_90) on the CPU and print their PTX as JSON:
`{name: {"pdl": ptx, "plain": ptx}}`. Run as a script by `test_kernel_compile`, in a process of
its own: a test process has Triton's library imported for its interpreter (`conftest`), where
the compiler cannot run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from codellama_lsp.model import decode_attention, gemv, kv_write, layer_kernels, rope_kernel

HOPPER = GPUTarget("cuda", 90, 32)
FLOAT32_POINTERS = {"table_ptr", "partial_ptr", "lse_ptr"}
FLOAT_SCALARS = {"eps", "scale"}
ALIGNED_INTS = {"dim", "words"}
INT64_POINTERS = {"rows_ptr", "start_ptr", "inbox_addresses"}
INT32_POINTERS = {"count_ptr", "rounds_ptr", "partials_ptr"}


def _signature(kernel: Any, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton types by parameter name: bf16 tensors, float32 softmax partials and rotary
    tables, int64 page tables and positions, int32 sizes and strides."""
    types = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
        elif name in FLOAT32_POINTERS:
            types[name] = "*fp32"
        elif name in INT64_POINTERS:  # page tables, positions, peer buffers' addresses
            types[name] = "*i64"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*bf16"
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    missing = {n for n, t in types.items() if t == "constexpr"} - set(constexprs)
    assert not missing, f"constexprs to give: {missing}"
    return types


def _ptx(kernel: Any, constexprs: dict[str, Any], warps: int = 4) -> str:
    signature = _signature(kernel, constexprs)
    # As a GPU launch specializes them: tensors' pointers (16-byte aligned) and the model's
    # width (a multiple of 16).
    divisible = [n for n, t in signature.items() if t.startswith("*") or n in ALIGNED_INTS]
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature) if n in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps, "launch_pdl": constexprs["PDL"]}
    return str(triton.compile(source, target=HOPPER, options=options).asm["ptx"])


def _kernels() -> list[tuple[str, Any, dict[str, Any]]]:
    split, merge = decode_attention._kernels()
    add_norm, silu, peer_add_norm = layer_kernels._kernels()
    gemv_shape = {"BLOCK_N": 16, "BLOCK_K": 256, "EVEN_N": True, "EVEN_K": True, "LINES": 4}
    return [
        ("gemv", gemv._kernel(), {**gemv_shape, "GATED": False}),
        ("gemv_gated", gemv._kernel(), {**gemv_shape, "GATED": True}),
        ("split", split, {"D": 128, "BLOCK_T": 32, "STAGES": None, "MERGE": True, "SPANS": 16}),
        ("merge", merge, {"D": 128, "SPANS": 16}),
        ("kv_write", kv_write._kernel(), {"H_KV": 32, "HEADS": 4, "D": 128}),
        ("rope", rope_kernel._kernel(), {"H": 32, "H_KV": 32, "HEADS": 2, "HALF": 64}),
        ("add_rms_norm", add_norm, {"BLOCK": 4096}),
        ("peer_add_rms_norm", peer_add_norm, {"WORLD": 2, "BLOCK": 8192, "PACK": 2}),
        ("silu_mul", silu, {"BLOCK": 1024}),
    ]


def main() -> None:
    out = {
        name: {
            "pdl": _ptx(kernel, {**shape, "PDL": True}),
            "plain": _ptx(kernel, {**shape, "PDL": False}),
        }
        for name, kernel, shape in _kernels()
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
