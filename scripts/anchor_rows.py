"""Chosen rows of the shared anchor benchmark (shared/bench/anchor_bench.py, carried in as
.anchor/): its own block builder and timing function, with the model built on the GPU (the
anchor initialises it on the CPU, minutes per row) and without its slow eager rows.

Env: ROWS=family:impl:rank,... (default: grouped_mm with and without LoRA r=16, both
families), TOKENS=8192, ITERS=10, OUT (anchor_rows.json there), GRADS=fresh to drop the
trainable gradients before each step (``moelab.bench experts --grads fresh``; the anchor adds
each step's to the last), COOLDOWN=seconds of idle GPU before each row and SUSTAIN=N steps
back to back after it (``moelab.bench experts --cooldown/--sustain``: rows from one power state,
and at the power cap). Each row records the SM clock it ran at. Device machine only.
"""

import json
import os
import sys
import time

import torch

sys.path[:0] = [".anchor", "."]  # run from the repository root: the anchor script and moelab
import anchor_bench as anchor  # noqa: E402

from moelab.bench.experts import dropping_grads  # noqa: E402
from moelab.bench.gpu_clock import clock_log  # noqa: E402

GRADS = os.environ.get("GRADS", "accumulate")
DEFAULT_ROWS = ",".join(
    f"{family}:grouped_mm:{rank}" for family in ("qwen3_30b_a3b", "gpt_oss_20b") for rank in (16, 0)
)


def _stepped(block):
    """The block, or with GRADS=fresh a call that first drops its trainable gradients."""
    if GRADS != "fresh":
        return block
    return dropping_grads(block, [p for p in block.parameters() if p.requires_grad])


def main() -> None:
    tokens = [int(t) for t in os.environ.get("TOKENS", "8192").split(",")]
    iters = int(os.environ.get("ITERS", "10"))
    cooldown = float(os.environ.get("COOLDOWN", "0"))
    sustain = int(os.environ.get("SUSTAIN", "0"))
    rows = []
    for spec in (os.environ.get("ROWS") or DEFAULT_ROWS).split(","):
        family, impl, rank = spec.split(":")
        with torch.device("cuda"):
            block, cfg = anchor.build(family, impl, int(rank))
        for t in tokens:
            x = torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            if cooldown:
                torch.cuda.synchronize()
                time.sleep(cooldown)
            with clock_log(x.device) as clock:
                ms, mib = anchor.time_block(_stepped(block), x, iters)
            row = dict(family=family, tokens=t, impl=impl, lora_rank=int(rank), ms=round(ms, 3),
                       peak_mib=round(mib, 1), grads=GRADS, clock=clock.summary())  # fmt: skip
            if sustain:
                with clock_log(x.device) as clock:
                    sustained = anchor.time_block(_stepped(block), x, sustain)[0]
                row["sustained_ms"] = round(sustained, 3)
                row["sustained_clock"] = clock.summary()
            print(json.dumps(row), flush=True)
            rows.append(row)
        del block
        torch.cuda.empty_cache()
    print("\nanchor rows (shared/bench/anchor_bench.py's build and time_block)")
    for r in rows:
        clock = r["clock"]["sm_mhz"] if r["clock"] else "n/a"
        sustained = f"  sustained {r['sustained_ms']:.3f} ms" if "sustained_ms" in r else ""
        print(f"{r['family']:<15}{r['tokens']:>7} {r['impl']:<12} r={r['lora_rank']:<3}"
              f"{r['ms']:>9.3f} ms{r['peak_mib']:>9.0f} MiB  {r['grads']}  {clock} MHz"
              f"{sustained}")  # fmt: skip
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "anchor_rows.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
