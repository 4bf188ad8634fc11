"""GPTQ packing and unpacking throughput (vectorized numpy), per bit width.

Usage: python bench/pack_throughput.py [--rows 4096] [--cols 14336]

Packs and unpacks a (rows x cols) matrix of random codes for 2, 3, 4 and 8 bits and reports
millions of weights per second. Writes bench/results/pack_throughput.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import write

from infq.formats.gptq import pack_rows, unpack_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=14336)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for bits in (2, 3, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(args.rows, args.cols), dtype=np.uint8)
        t0 = time.perf_counter()
        packed = pack_rows(codes, bits)
        t1 = time.perf_counter()
        back = unpack_rows(packed, bits)
        t2 = time.perf_counter()
        assert np.array_equal(back, codes)
        n = codes.size / 1e6
        rows.append({"bits": bits, "pack_mweights_per_s": n / (t1 - t0), "unpack_mweights_per_s": n / (t2 - t1)})
        print(f"{bits}-bit: pack {n / (t1 - t0):.0f} M weights/s, unpack {n / (t2 - t1):.0f} M weights/s")
    path = write("pack_throughput.json", {"shape": [args.rows, args.cols], "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
