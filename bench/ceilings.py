"""The two ceilings every other figure is stated against, measured on this card now.

- copy rate: a large device-to-device copy, counting bytes read plus bytes written;
- bf16 matrix-product rate: a large square product on random data (never zeros).

    python bench/ceilings.py [--json results.json]      # python bench/ceilings.py --tiny on CPU
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from common import Results, base_parser, median_time


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # read + written
    matmul_flops_per_s: float


def copy_rate(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats, warmup=3)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, repeats, warmup=3)
    return 2 * n**3 / seconds


def measure(device: torch.device, tiny: bool = False) -> Ceilings:
    """Both ceilings; tiny sizes (and float32 products) on CPU smoke runs."""
    if tiny or device.type != "cuda":
        return Ceilings(copy_rate(device, 1 << 26, 5), matmul_rate(device, 512, torch.float32, 5))
    return Ceilings(copy_rate(device, 1 << 31), matmul_rate(device, 8192, torch.bfloat16))


def record(results: Results, ceilings: Ceilings, tiny: bool) -> None:
    copy_note = "64 MiB buffers" if tiny else "2 GiB buffers"
    mm_note = "512^3 float32" if tiny else "8192^3 bf16, random data"
    results.add(
        "ceiling_copy_read_plus_write", ceilings.copy_bytes_per_s / 1e9, "GB/s", None, copy_note
    )
    results.add("ceiling_matmul", ceilings.matmul_flops_per_s / 1e12, "TFLOP/s", None, mm_note)


def main() -> None:
    args = base_parser(__doc__ or "").parse_args()
    device = torch.device(args.device)
    results = Results(device, args.json)
    tiny = args.tiny or device.type != "cuda"
    record(results, measure(device, tiny), tiny)
    results.finish()


if __name__ == "__main__":
    main()
