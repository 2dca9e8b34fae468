"""The triton experts' host path on the CPU, without a GPU: what the host does to issue one
forward + backward (LoRA), with every Triton launch taken through its real argument
preparation, specialisation and lookups up to a launcher that does nothing.

On the GPU machine the eager step at small token counts is bound by the host (BENCHMARKS.md,
runs 75-79), and device time is scarce; this measures changes to the launch path's Python
first. It found Triton's host ``cdiv`` costing ~75 us of ~450 per step (run 79 confirmed
0.06-0.15 ms on the GPU machine's host). The stand-in leaves out what only the GPU path does:
CUDA allocations, Triton's C launcher and its TMA descriptor encoding, torch's CUDA ops.

    python scripts/host_standin.py --shape qwen3          # host us per step (median, min)
    python scripts/host_standin.py --profile tottime      # and cProfile's top functions

Tensors are small (the host path depends on the expert count, k and the flags, not on the
sizes), so torch's own CPU ops add little; the dispatch plan comes from
:func:`moelab.ops.dispatch.dispatch` so that torch's index ops get valid rows.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch

# shapes of the host path: experts, k, biases and GPT-OSS's activation (sizes kept small)
SHAPES = {"qwen3": (128, 8, False), "gpt-oss": (32, 4, True)}
_FIXED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, BLOCK_P=32, num_warps=4,
              num_stages=3, SM_PROGRAMS=1, EVEN_K=True, EVEN_N=True)  # fmt: skip


def stand_in(placement: str) -> None:
    """Route every launch to a no-op launcher after its real host work (see the module)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from moelab.kernels import launch as kl
    from moelab.kernels import triton as tr
    from moelab.kernels import triton_kernels as tk
    from moelab.kernels import triton_tuning as tuning
    from moelab.ops.dispatch import dispatch

    kl.setting.cache_clear()

    class AnyKernel(dict):
        """Every specialisation 'compiled' already, to a launcher that does nothing."""

        def get(self, key, default=None):
            return kl._Direct(None, lambda *args: None, 0, None, ())

    kl._compiled = AnyKernel()
    kl._current_device = lambda: 0
    kl._raw_stream = lambda device: 0
    tuning.autotune_enabled = lambda: True
    tuning.measures = lambda a: False
    tuned = tuning.run_tuned

    def run_tuned(plain, kernel, key, grid, args, flags, derived=lambda c: {}, prepare=None,
                  device=None):  # fmt: skip
        if key not in tuning._chosen:  # a fixed configuration instead of tuning
            tuning._chosen[key] = dict(flags, **{k: v for k, v in _FIXED.items() if k not in flags})
        tuned(plain, kernel, key, grid, args, flags, derived, prepare, None)

    tuning.run_tuned = run_tuned

    def dispatch_tiles(experts_TK, num_experts, weights_TK=None):
        plan = dispatch(experts_TK, num_experts)
        slots = plan.token_N.numel() // tk.TILE_BLOCKS_M[0] + num_experts + 1
        w_N = None if weights_TK is None else weights_TK.reshape(-1)[plan.order_N]
        return plan, torch.zeros(2, 4, slots, dtype=torch.int32), w_N

    tr.dispatch_tiles = dispatch_tiles
    mode = tk.LORA_GIVEN if placement == "given" else tk.LORA_IN_LOOP
    tr.LORA_PLACEMENT = dict.fromkeys(tr.LORA_PLACEMENT, mode)
    tr.DOWN_BACKWARD_MAIN = "gathered"


def make_step(shape: str, rank: int = 16):
    from moelab.kernels import triton as tr

    experts, top_k, gpt_oss = SHAPES[shape]
    tokens, hidden, inter = 64, 64, 32
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, hidden, generator=g).to(bf)
    w0 = torch.rand(tokens, top_k, generator=g)
    experts_TK = torch.randn(tokens, experts, generator=g).topk(top_k, dim=1).indices
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g).to(bf)
    down = torch.randn(experts, hidden, inter, generator=g).to(bf)
    gate_up_bias = torch.randn(experts, 2 * inter, generator=g).to(bf) if gpt_oss else None
    down_bias = torch.randn(experts, hidden, generator=g).to(bf) if gpt_oss else None
    shapes = ((experts, rank, hidden), (experts, 2 * inter, rank), (experts, rank, inter),
              (experts, hidden, rank))  # fmt: skip
    lora = [torch.randn(*s, generator=g).to(bf).requires_grad_(True) for s in shapes]
    dout = torch.randn(tokens, hidden, generator=g).to(bf)
    activation = "swiglu_oai" if gpt_oss else "swiglu"

    def step() -> None:
        x = x0.detach().requires_grad_(True)
        w = w0.detach().requires_grad_(True)
        # fmt: off
        out = tr._TritonExperts.apply(x, w, experts_TK, gate_up, down, gate_up_bias, down_bias,
                                      *lora, 2.0, activation, False)
        # fmt: on
        out.backward(dout)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3")
    p.add_argument(
        "--placement",
        choices=("given", "in_loop"),
        default="given",
        help="LoRA's z by a rank-r launch first (given) or in the main loop",
    )
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--profile", choices=("tottime", "cumulative"), default=None)
    args = p.parse_args()
    stand_in(args.placement)
    step = make_step(args.shape)
    for _ in range(10):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med, low = statistics.median(times) * 1e6, min(times) * 1e6
    print(f"{args.shape}, LoRA z {args.placement}: host us per experts forward + backward "
          f"(CPU stand-in): median {med:.0f}, min {low:.0f}")  # fmt: skip
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats(args.profile).print_stats(30)


if __name__ == "__main__":
    main()
