"""Launch choices of the triton backend that the shared backend matrix does not vary.

The matrix in test_experts.py runs the default LoRA placement and the fixed configuration; here
each rank-r placement and several column blocks are checked against the same float64 reference.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import LOGITS_GRAD_TOLERANCE, TEST_DEVICE, TOLERANCE, rel_err
from test_experts import CASES, VARIANTS, Case, make_problem, run_backend, run_reference, trainables

from moelab.kernels import triton as tr
from moelab.kernels import triton_grads as tg
from moelab.kernels import triton_kernels as tk
from moelab.ops import route

PLACEMENTS = {
    "all in loop": dict.fromkeys(tr.LORA_PLACEMENT, tk.LORA_IN_LOOP),
    "all rank-r launches": dict.fromkeys(tr.LORA_PLACEMENT, tk.LORA_GIVEN),
    "mixed": {"up": tk.LORA_GIVEN, "down": tk.LORA_IN_LOOP, "bwd_down": tk.LORA_GIVEN,
              "bwd_up": tk.LORA_IN_LOOP},
}  # fmt: skip


def _check_against_reference(p: dict, recompute: bool = False) -> dict[str, torch.Tensor]:
    """The triton backend's output and every gradient asked for, against float64; returns the
    gradients."""
    out, grads = run_backend(p, "triton", recompute)
    experts_TK = route(p["logits"], "softmax_topk", p["case"].top_k).experts
    ref_out, ref_grads = run_reference(p, experts_TK)
    tol = TOLERANCE[p["x"].dtype]
    assert rel_err(out, ref_out) <= tol
    for name, grad in grads.items():
        limit = LOGITS_GRAD_TOLERANCE[p["x"].dtype] if name == "logits" else tol
        assert rel_err(grad, ref_grads[name]) <= limit, name
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_lora_placements_match_reference(monkeypatch, placement, dtype):
    monkeypatch.setattr(tr, "LORA_PLACEMENT", PLACEMENTS[placement])
    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2, cold=(1,))
    _check_against_reference(make_problem(case, "all_trainable", dtype, seed=11))


EDGE_CASES = [c for c in CASES if c.name in ("T=1", "empty experts", "all tokens on one expert")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("main", ["gathered", "torch"])
def test_down_backward_on_a_separate_main_loop_matches_reference(
    monkeypatch, main, case, variant, dtype
):
    """The down projection's backward with g stored by its own product (ours gathering dout's
    rows, or torch's grouped GEMM on a gathered copy) and the SwiGLU epilogue run alone
    (``DOWN_BACKWARD_MAIN``): every output and gradient as the float64 reference, at the edge
    cases of the backend matrix."""
    monkeypatch.setattr(tr, "DOWN_BACKWARD_MAIN", main)
    _check_against_reference(make_problem(case, variant, dtype, seed=17))


@pytest.mark.parametrize("block_m, block_n", [(64, 32), (64, 128), (128, 64)])
def test_tile_shape_does_not_change_results(monkeypatch, block_m, block_n):
    """Autotuning may pick any tile height and column block; the router partials (one per 32
    columns) and every other output must not depend on them. inter=48 leaves a partial column
    block for each choice; 40 tokens x 2 leave partial row tiles of either height."""
    monkeypatch.setattr(tr.tuning, "autotune_enabled", lambda: False)  # _FIXED, also on a GPU
    case = Case("wide", tokens=40, hidden=80, inter=48, experts=5, top_k=2)
    p = make_problem(case, "all_trainable", torch.float32, seed=12)
    out_ref, grads_ref = run_backend(p, "triton")
    # two stages: three of the fp32 SwiGLU product's 64 x 2*128 W tiles overflow an H200's
    # shared memory (run 92); the stages change no result
    fixed = dict(tr._FIXED, BLOCK_M=block_m, BLOCK_N=block_n, num_stages=2)
    monkeypatch.setattr(tr, "_FIXED", fixed)
    out, grads = run_backend(p, "triton")
    assert rel_err(out, out_ref) <= 1e-6
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["lora", "all_trainable"])
def test_weights_read_by_descriptor_or_pointer_give_the_same_bits(monkeypatch, variant, dtype):
    """W through TMA descriptors (boxes per expert, zeros past its edge) and through masked
    pointer loads: the same products, so the same bits. hidden=72 and inter=40 leave partial
    K and column blocks in every product."""
    case = Case("wide", tokens=40, hidden=72, inter=40, experts=5, top_k=2, cold=(1,))
    p = make_problem(case, variant, dtype, seed=13)
    modes = []
    real = tr._w_descriptor
    monkeypatch.setattr(tr, "_w_descriptor", lambda *a: modes.append(real(*a)[0]) or real(*a))
    out_tma, grads_tma = run_backend(p, "triton")
    assert set(modes) == {1, 2}  # every product read W by descriptor
    monkeypatch.setattr(tr, "_tma_enabled", lambda: False)
    modes.clear()
    out, grads = run_backend(p, "triton")
    assert set(modes) == {0}
    assert torch.equal(out, out_tma)
    for name in grads:
        assert torch.equal(grads[name], grads_tma[name]), name


class _FlagsSeen:
    """Stands in for a Triton kernel: records each launch's LORA and W_DESC flags, then
    launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((kwargs["LORA"], kwargs["W_DESC"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("measured", [False, True], ids=["fixed placement", "measured"])
def test_z_in_the_loop_with_w_by_pointer_comes_from_a_rank_r_launch_first(monkeypatch, measured):
    """Where Triton miscompiles z in the main loop (W by pointer, on the GPU: run 93), no
    product computes it there: each asked for it in the loop gets its rank-r launch first and
    reads z as given, or, where the placement is measured, is given z without timing the two
    (they would be the same launches); the step still matches float64. Forced on here, with
    TMA off, under the interpreter."""
    monkeypatch.setattr(tr, "_tma_enabled", lambda: False)
    monkeypatch.setattr(tr, "DOWN_BACKWARD_MAIN", "triton")
    monkeypatch.setattr(tr, "_in_loop_unsafe", lambda w_mode, acc_in: not (w_mode or acc_in))
    monkeypatch.setattr(tr.tuning, "autotune_enabled", lambda: False)  # launches through the JIT
    if measured:
        monkeypatch.setattr(tr.tuning, "measures", lambda a: True)
        monkeypatch.setattr(tr.tuning, "fastest", lambda *a: pytest.fail("timed a placement"))
        monkeypatch.setattr(tr, "_placements", tr.MeasuredChoices("unused.json", ()))
    else:
        monkeypatch.setattr(tr, "LORA_PLACEMENT", dict.fromkeys(tr.LORA_PLACEMENT, tk.LORA_IN_LOOP))
    gemm = _FlagsSeen(tk._expert_gemm_kernel)
    monkeypatch.setattr(tk, "_expert_gemm_kernel", gemm)
    case = Case("wide", tokens=40, hidden=72, inter=40, experts=5, top_k=2, cold=(1,))
    _check_against_reference(make_problem(case, "lora", torch.float32, seed=13))
    # up, down, dY W2 and dX given z, each after its rank-r launch; W by pointer throughout
    assert sorted(gemm.seen) == [(tk.LORA_NONE, 0)] * 4 + [(tk.LORA_GIVEN, 0)] * 4


def test_z_in_the_loop_is_unsafe_only_on_the_gpu_with_w_by_pointer(monkeypatch):
    monkeypatch.setattr(tr.kl, "interpreting", lambda: False)
    assert tr._in_loop_unsafe(0, acc_in=False)
    assert not any(tr._in_loop_unsafe(mode, acc_in=False) for mode in (1, 2))
    assert not tr._in_loop_unsafe(0, acc_in=True)  # no main loop: always given its z
    monkeypatch.setattr(tr.kl, "interpreting", lambda: True)
    assert not tr._in_loop_unsafe(0, acc_in=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("placement", ["all in loop", "all rank-r launches"])
def test_persistent_and_tiled_kernels_give_the_same_bits(monkeypatch, placement, variant, dtype):
    """The down projection and dX products (plain stores over sorted rows) run on the
    persistent kernel, 3 programs taking several tiles each here; the tiled kernel gives the
    same bits (same tiles, K order and roundings), biases and LoRA included, z in the loop or
    given (then z and lb read by TMA). hidden=72 and inter=40 leave partial K and column
    blocks, 40 tokens x 2 partial row tiles; rank 16 is a given z's TMA box."""
    monkeypatch.setattr(tr, "LORA_PLACEMENT", PLACEMENTS[placement])
    case = Case("wide", tokens=40, hidden=72, inter=40, experts=5, top_k=2, cold=(1,), rank=16)
    p = make_problem(case, variant, dtype, seed=19)
    launched, lb_modes = _persistent_then_tiled(monkeypatch, p)
    assert launched == 2  # down projection, dX
    if p["lora"] is not None:  # lb [E, H, r] (B2) and [E, r, H] (A1), both by TMA
        assert sorted(lb_modes) == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [8, 24])
def test_given_z_below_its_block_reads_zeros_past_the_rank(monkeypatch, rank, dtype):
    """Ranks 8 and 24 (blocks of 16 and 32): a given z and lb are read by TMA boxes reaching
    past r, whose zeros give the same bits as the tiled kernel's masked pointer loads."""
    monkeypatch.setattr(tr, "LORA_PLACEMENT", PLACEMENTS["all rank-r launches"])
    case = Case("wide", tokens=40, hidden=72, inter=40, experts=5, top_k=2, cold=(1,), rank=rank)
    p = make_problem(case, "lora", dtype, seed=23)
    launched, lb_modes = _persistent_then_tiled(monkeypatch, p)
    assert launched == 2
    assert sorted(lb_modes) == [1, 2]  # down projection (B2) and dX (A1), both by TMA


def _persistent_then_tiled(monkeypatch, p: dict) -> tuple[int, list[int]]:
    """Runs ``p`` on the triton backend, then again with the persistent kernel switched off,
    and asserts the second run launched no persistent kernel and gave the same bits; returns
    the first run's persistent launches and its lb descriptor modes."""
    lb_modes, launched = [], []
    real_descs, real = tr._lora_descriptors, tr._launch_persistent
    monkeypatch.setattr(
        tr, "_lora_descriptors", lambda *a: lb_modes.append(real_descs(*a)[0]) or real_descs(*a)
    )
    monkeypatch.setattr(tr, "_launch_persistent", lambda *a: launched.append(a) or real(*a))
    out_p, grads_p = run_backend(p, "triton")
    first = len(launched), list(lb_modes)
    monkeypatch.setattr(tr, "_persistent_enabled", lambda: False)
    launched.clear()
    out, grads = run_backend(p, "triton")
    assert not launched
    assert torch.equal(out, out_p)
    for name in grads:
        assert torch.equal(grads[name], grads_p[name]), name
    return first


@pytest.mark.parametrize(
    "shape, tokens, rank, activation, capability, picked",
    [
        ((128, 8), 1024, 16, "swiglu", (9, 0), True),  # Qwen3 LoRA, 64 rows per expert
        ((128, 8), 512, 16, "swiglu", (9, 0), False),  # 32: measured slower (run 53)
        ((128, 8), 1024, 0, "swiglu", (9, 0), True),  # full fine-tune, 64 rows per expert
        ((128, 8), 512, 0, "swiglu", (9, 0), False),
        ((32, 4), 1024, 16, "swiglu_oai", (9, 0), True),  # GPT-OSS LoRA, 128 rows per expert
        ((32, 4), 256, 16, "swiglu_oai", (9, 0), True),  # 32: measured faster (run 53)
        ((32, 4), 256, 0, "swiglu_oai", (9, 0), True),
        ((32, 4), 128, 16, "swiglu_oai", (9, 0), True),  # 16: measured faster (runs 53, 57)
        ((32, 4), 128, 0, "swiglu_oai", (9, 0), True),
        ((32, 4), 64, 16, "swiglu_oai", (9, 0), False),  # 8: not measured
        ((32, 4), 64, 0, "swiglu_oai", (9, 0), False),
        ((32, 4), 65536, 16, "swiglu_oai", (8, 0), False),  # not tuned or measured before Hopper
    ],
)
def test_auto_picks_triton_where_it_measured_faster(
    shape, tokens, rank, activation, capability, picked
):
    from moelab.kernels.problem import ExpertProblem

    experts, top_k = shape
    problem = ExpertProblem(
        device=torch.device("cuda"), dtype=torch.bfloat16, num_tokens=tokens, top_k=top_k,
        num_experts=experts, hidden=2048, inter=768, lora_rank=rank,
        has_bias=activation == "swiglu_oai", activation=activation,
    )  # fmt: skip
    reason = tr._measured_slower(problem, capability)
    assert (reason is None) == picked, reason
    if not picked and capability >= (9, 0):
        assert activation in reason and "rows per expert" in reason


@pytest.mark.parametrize("variant", ["lora", "all_trainable"])
def test_recomputing_h_gives_the_same_bits(variant):
    """``recompute=True`` reruns the forward's up projection in backward instead of keeping h:
    the same kernel on the same rows, so outputs and gradients are bit-identical."""
    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2, cold=(1,))
    p = make_problem(case, variant, torch.float32, seed=13)
    out_kept, grads_kept = run_backend(p, "triton", recompute=False)
    out, grads = run_backend(p, "triton", recompute=True)
    assert torch.equal(out, out_kept)
    for name in grads:
        assert torch.equal(grads[name], grads_kept[name]), name


@pytest.mark.parametrize("backend", ["native_torch", "grouped_mm"])
def test_recompute_is_refused_by_backends_that_keep_h(backend):
    case = Case("wide", tokens=8, hidden=64, inter=48, experts=5, top_k=2)
    p = make_problem(case, "lora", torch.float32, seed=16)
    with pytest.raises(ValueError, match="recompute is triton's"):
        run_backend(p, backend, recompute=True)


@pytest.mark.parametrize("recompute", [False, True])
def test_saved_bytes_per_token_is_what_backward_keeps(recompute):
    """The benchmark's bytes-per-token figure against the tensors autograd actually saves
    (weights, LoRA factors and the per-expert tile table and offsets excluded)."""
    from moelab.kernels.problem import ExpertProblem
    from moelab.ops import moe_experts

    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2)
    p = make_problem(case, "lora", torch.bfloat16, seed=14)
    routing = route(p["logits"], "softmax_topk", case.top_k)
    params = {p["gate_up"].data_ptr(), p["down"].data_ptr()}
    params |= {t.data_ptr() for t in p["lora"].tensors()}
    saved = {}

    def pack(t):
        per_expert = t.dtype == torch.int32  # the tile table and the expert offsets
        if t.data_ptr() not in params and not per_expert:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe_experts(p["x"], routing, p["gate_up"], p["down"], lora=p["lora"], backend="triton",
                    recompute=recompute)  # fmt: skip
    problem = ExpertProblem(
        device=p["x"].device, dtype=p["x"].dtype, num_tokens=case.tokens, top_k=case.top_k,
        num_experts=case.experts, hidden=case.hidden, inter=case.inter,
        lora_rank=p["lora"].rank, has_bias=False, activation="swiglu", recompute=recompute,
    )  # fmt: skip
    assert sum(saved.values()) == case.tokens * tr.saved_bytes_per_token(problem, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_a", [True, False], ids=["A layout", "B layout"])
@pytest.mark.parametrize("p_dim", [5, 150], ids=["rank 5", "150 columns"])
def test_expert_grad_kernel_against_float64(dtype, is_a, p_dim):
    """``expert_grad``: per-expert ``s q[rows]^T (w p)`` with q read through a token index, an
    empty expert (zeros), a width that leaves a partial column block, in either output layout;
    p's columns a rank (one block, not a power of two) or wider than one block (tiled, the last
    block partial)."""
    torch.manual_seed(5)
    tokens, width, scale = 23, 45, 0.75
    counts = torch.tensor([7, 0, 19, 1, 13])
    rows = int(counts.sum())
    offs_E = counts.cumsum(0).to(TEST_DEVICE, torch.int32)
    token_N = torch.randint(0, tokens, (rows,)).to(TEST_DEVICE)
    q = torch.randn(tokens, width, dtype=dtype).to(TEST_DEVICE)
    p = torch.randn(rows, p_dim, dtype=dtype).to(TEST_DEVICE)
    w = torch.rand(rows).to(TEST_DEVICE)
    out_shape = (5, p_dim, width) if is_a else (5, width, p_dim)
    out = torch.full(out_shape, float("nan"), dtype=dtype, device=TEST_DEVICE)
    strides = tr._t(out) if is_a else out.stride()
    tg.expert_grad(q, p, offs_E, out, strides, scale, gather=token_N, row_scale=w)
    ws = (p.float() * w[:, None]).to(dtype).double()
    qs = q.double()[token_N]
    start = 0
    for e, n in enumerate(counts.tolist()):
        ref = scale * qs[start : start + n].t() @ ws[start : start + n]  # [width, p_dim]
        got = out[e].double().t() if is_a else out[e].double()
        if n == 0:
            assert torch.equal(got, torch.zeros_like(got))
        else:
            assert rel_err(got, ref) <= TOLERANCE[dtype]
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [None, "contiguous", "transposed"])
@pytest.mark.parametrize(
    "tokens, top_k, parts, hidden",
    [(1, 1, 1, 8), (29, 3, 24, 200), (70, 4, 90, 130), (9, 2, 300, 70)],
    ids=["T=1 k=1", "24 partials", "90 partials, two programs", "300 partials, 3 blocks"],
)
def test_router_grad_kernel_against_float64(dtype, bias, tokens, top_k, parts, hidden):
    """``router_grad``: each routed row's partials summed and returned to its (token, slot),
    plus ``<dout_t, b2[e]>`` with a down bias (also one read through transposed strides),
    against float64; partial counts and widths that are not powers of two (a partial last
    block of each, and more partials than one block holds), an expert that gets no rows."""
    from moelab.ops.dispatch import dispatch

    torch.manual_seed(9)
    num_experts = 6
    logits = torch.randn(tokens, num_experts)
    logits[:, 2] = -1e4  # expert 2 gets no rows
    experts_TK = logits.topk(top_k, dim=1).indices.to(TEST_DEVICE)
    plan = dispatch(experts_TK, num_experts)
    parts_NP = torch.randn(tokens * top_k, parts).to(TEST_DEVICE)
    dout_TH = torch.randn(tokens, hidden).to(TEST_DEVICE, dtype)
    down_bias = None
    if bias == "contiguous":
        down_bias = torch.randn(num_experts, hidden).to(TEST_DEVICE, dtype)
    elif bias == "transposed":
        down_bias = torch.randn(hidden, num_experts).to(TEST_DEVICE, dtype).t()
    got = tr.router_grad(parts_NP, plan, dout_TH, down_bias, experts_TK)
    ref = parts_NP.double().sum(1)[plan.slot_TK]
    if bias:
        ref += (dout_TH.double() @ down_bias.double().t()).gather(1, experts_TK)
    assert got.dtype == torch.float32 and got.shape == (tokens, top_k)
    assert rel_err(got, ref) <= 1e-5


def test_router_grad_reads_no_bias_for_expert_ids_out_of_range():
    """Ids outside ``[0, E)`` (unchecked on the GPU by default) get their partials and no bias
    term, rather than a read past the bias tensor."""
    from moelab.ops.dispatch import dispatch

    torch.manual_seed(3)
    tokens, top_k, num_experts, hidden = 6, 2, 4, 40
    experts_TK = torch.tensor([[0, 1], [2, 3], [1, 4], [0, 2], [-1, 3], [3, 1]], device=TEST_DEVICE)
    plan = dispatch(experts_TK.clamp(0, num_experts - 1), num_experts)  # any valid slots
    parts_NP = torch.randn(tokens * top_k, 5, device=TEST_DEVICE)
    dout_TH = torch.randn(tokens, hidden, device=TEST_DEVICE)
    down_bias = torch.randn(num_experts, hidden, device=TEST_DEVICE)
    got = tr.router_grad(parts_NP, plan, dout_TH, down_bias, experts_TK)
    ref = parts_NP.double().sum(1)[plan.slot_TK]
    known = (experts_TK >= 0) & (experts_TK < num_experts)
    bias_term = (dout_TH.double() @ down_bias.double().t()).gather(1, experts_TK.clamp(0, 3))
    ref += torch.where(known, bias_term, 0.0)
    assert rel_err(got, ref) <= 1e-6


@pytest.fixture
def weight_grads_setting(moelab_setting):
    """Sets ``MOELAB_TRITON_WEIGHT_GRADS`` for one test."""
    return functools.partial(moelab_setting, "MOELAB_TRITON_WEIGHT_GRADS")


@pytest.mark.parametrize("path", ["triton", "torch", "given copy"])
@pytest.mark.parametrize("out_jd", [True, False], ids=["dW1 layout", "dW2 layout"])
def test_weight_grad_paths_against_float64(monkeypatch, weight_grads_setting, path, out_jd):
    """``weight_grad`` by either path (``MOELAB_TRITON_WEIGHT_GRADS``), or on a gathered copy
    already made (torch's path whatever the setting): ``sum_{n of e} tokens[token(n)]^T
    rows[n]`` per expert, the token-order operand read through the dispatch plan, an empty
    expert's gradient zero."""
    weight_grads_setting("triton" if path == "given copy" else path)
    torch_calls = []
    real = tr.gmm._gmm_wgrad
    monkeypatch.setattr(tr.gmm, "_gmm_wgrad", lambda *a: torch_calls.append(1) or real(*a))
    torch.manual_seed(8)
    tokens, experts, top_k, d_dim, j_dim = 30, 5, 2, 40, 144
    logits = torch.randn(tokens, experts)
    logits[:, 3] = -30.0  # expert 3 gets no rows
    experts_TK = logits.topk(top_k, dim=1).indices.to(TEST_DEVICE)
    plan, _, _ = tr.dispatch_tiles(experts_TK, experts)
    rows = plan.token_N.numel()
    tokens_TD = torch.randn(tokens, d_dim).to(TEST_DEVICE)
    rows_NJ = torch.randn(rows, j_dim).to(TEST_DEVICE)
    copy = tokens_TD.index_select(0, plan.token_N) if path == "given copy" else None
    got = tg.weight_grad(tokens_TD, rows_NJ, plan, out_jd, gathered_ND=copy)
    expert_N = plan.expert_N.long()
    for e in range(experts):
        sel = expert_N == e
        ref = tokens_TD.double()[plan.token_N[sel]].t() @ rows_NJ.double()[sel]  # [D, J]
        ref = ref.t() if out_jd else ref
        if e == 3:
            assert not sel.any() and torch.equal(got[e], torch.zeros_like(got[e]))
        else:
            assert rel_err(got[e].double(), ref) <= TOLERANCE[torch.float32]
    assert len(torch_calls) == (path != "triton")


def test_weight_grad_setting_refuses_an_unknown_path(weight_grads_setting):
    weight_grads_setting("cutlass")
    with pytest.raises(ValueError, match="MOELAB_TRITON_WEIGHT_GRADS='cutlass'"):
        tg._weight_grads_setting()


def test_up_projection_without_the_activation_writes_the_same_h():
    """Backward's recompute asks the up projection for h alone: same h bits, no act buffer."""
    torch.manual_seed(9)
    tokens, hidden, inter, experts = 20, 32, 24, 4
    x = torch.randn(tokens, hidden).to(TEST_DEVICE)
    gate_up = (torch.randn(experts, 2 * inter, hidden) * 0.2).to(TEST_DEVICE)
    experts_TK = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    plan, tiles, _ = tr.dispatch_tiles(experts_TK.to(TEST_DEVICE), experts)
    rows = plan.token_N.numel()
    h, act = tr.up_projection(x, gate_up, None, None, plan, tiles, oai=False)
    h_only, none = tr.up_projection(x, gate_up, None, None, plan, tiles, False, False)
    assert none is None and act.shape == (rows, inter)
    assert torch.equal(h_only, h)


def _reference_tile_table(offs_E: torch.Tensor, block_m: int, slots: int) -> torch.Tensor:
    """Each expert's rows cut into block_m tiles, in expert order, padded with expert -1."""
    table, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        table += [(e, first, end) for first in range(start, end, block_m)]
        start = end
    table += [(-1, 0, 0)] * (slots - len(table))
    return torch.tensor(table, dtype=torch.int32).t()


@pytest.mark.parametrize(
    "counts",
    [
        [5, 0, 130, 64, 0, 1],
        [0, 0, 0, 1],  # T = 1
        [2500, 1, 3000],  # several programs of either size
        [0, 300, 0],  # all rows on one expert
        [7],  # a single expert
        [128] * 40,  # exact multiples of both heights
        torch.randint(0, 200, (300,), generator=torch.Generator().manual_seed(3)).tolist(),
    ],
)
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("block", [256, 1024])
def test_dispatch_kernels_give_the_sorted_plan_and_every_experts_row_tiles(
    monkeypatch, counts, top_k, block
):
    """The two dispatch launches against torch's stable sort (moelab.ops.dispatch, bit for
    bit) and the tile tables against a Python listing, at the smallest and largest rows per
    program. The routed rows come in a random order, so each block of rows mixes experts."""
    from moelab.ops.dispatch import dispatch

    monkeypatch.setattr(tr, "_dispatch_block", lambda rows: block)
    counts_E = torch.tensor(counts)
    rows = int(counts_E.sum())
    rows += -rows % top_k  # whole tokens: the remainder goes to the last expert
    counts_E[-1] += rows - int(counts_E.sum())
    ids = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
    ids = ids[torch.randperm(rows, generator=torch.Generator().manual_seed(5))]
    experts_TK = ids.view(-1, top_k).to(TEST_DEVICE)
    weights_TK = torch.rand(experts_TK.shape).to(TEST_DEVICE)
    plan, got, w_N = tr.dispatch_tiles(experts_TK, len(counts), weights_TK)
    for field, ref in zip(plan.tensors(), dispatch(experts_TK, len(counts)).tensors()):
        assert field.dtype == ref.dtype and torch.equal(field, ref)
    assert torch.equal(w_N, weights_TK.reshape(-1)[plan.order_N])  # the weights, sorted
    offs_E = plan.offs_E
    for i, block_m in enumerate(tk.TILE_BLOCKS_M):
        slots = -(-rows // block_m) + offs_E.numel()  # the GEMM grid's row tiles
        ref = _reference_tile_table(offs_E, block_m, slots)
        assert torch.equal(got[i, :3, :slots].cpu(), ref)
        assert int(got[i, 3, 0]) == int((ref[0] >= 0).sum())  # the row tiles listed


@pytest.mark.parametrize(
    "rows, block", [(1, 256), (32768, 256), (65536, 512), (131072, 1024), (524288, 1024)]
)
def test_dispatch_runs_about_128_programs_of_256_to_1024_rows(rows, block):
    assert tr._dispatch_block(rows) == block


def test_dispatch_places_ids_out_of_range_after_every_expert():
    """Bad ids (unchecked on the GPU) must not make the kernels write out of bounds: they sort
    after all experts, in their order, and no tile covers them."""
    experts_TK = torch.tensor([[0, 7], [-1, 2], [2, 0], [5, 1]], device=TEST_DEVICE)
    weights_TK = torch.arange(8.0, device=TEST_DEVICE).view(4, 2)
    plan, tiles, w_N = tr.dispatch_tiles(experts_TK, 3, weights_TK)
    assert plan.offs_E.tolist() == [2, 3, 5]
    assert plan.order_N.tolist() == [0, 5, 7, 3, 4, 1, 2, 6]
    assert w_N.tolist() == [0.0, 5.0, 7.0, 3.0, 4.0, 1.0, 2.0, 6.0]
    assert plan.slot_TK.reshape(-1)[plan.order_N].tolist() == list(range(8))
    assert int(tiles[:, 2].max()) == 5


@pytest.mark.parametrize(
    "rows, experts, heights",
    [(8192, 128, {64}), (65536, 128, {64, 128}), (131072, 128, {64, 128}), (262144, 32, {128})],
)
def test_autotuning_times_the_tile_heights_that_may_win(rows, experts, heights):
    import triton

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 64}) for bm in tk.TILE_BLOCKS_M]
    kept = tr._tile_heights_worth_timing(configs, dict(num_rows=rows, num_experts=experts))
    assert {c.kwargs["BLOCK_M"] for c in kept} == heights


@pytest.mark.parametrize("main", ["triton", "gathered", "torch"])
def test_down_backward_gives_dw2_on_the_torch_loops_gathered_dout(monkeypatch, main):
    """Full fine-tune's dW2 comes with the down projection's backward, as the float64 sum of
    dout^T (w act) per expert; on the torch main loop it reuses that loop's gathered dout (one
    gather, not two); the other loops gather nothing, so dW2 takes its own path."""
    torch.manual_seed(4)
    tokens, hidden, inter, experts = 12, 32, 16, 3
    dout = torch.randn(tokens, hidden).to(TEST_DEVICE)
    down = (torch.randn(experts, hidden, inter) * 0.2).to(TEST_DEVICE)
    experts_TK = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    plan, tiles, _ = tr.dispatch_tiles(experts_TK.to(TEST_DEVICE), experts)
    rows = plan.token_N.numel()
    h = torch.randn(rows, 2 * inter).to(TEST_DEVICE)
    w_N = torch.rand(rows).to(TEST_DEVICE)
    handed = []
    weight_grad = tg.weight_grad
    monkeypatch.setattr(tg, "weight_grad", lambda *a, **k: handed.append(k) or weight_grad(*a, **k))
    args = (dout, down, h, w_N, None, plan, tiles, False)
    with_dw2 = tr.down_backward(*args, want_actw=True, main=main, weight_grad=True)
    plain = tr.down_backward(*args, want_actw=True, main=main)
    assert plain[3] is None and len(handed) == 1
    for got, ref in zip(with_dw2[:3], plain[:3]):
        assert torch.equal(got, ref)
    if main == "torch":
        assert torch.equal(handed[0]["gathered_ND"], dout[plan.token_N])
    else:
        assert handed[0]["gathered_ND"] is None
    act_w = plain[2].double()
    ref = torch.zeros(experts, hidden, inter, dtype=torch.float64)
    ids = experts_TK.reshape(-1)[plan.order_N.cpu()]
    for n in range(rows):
        ref[ids[n]] += torch.outer(dout[plan.token_N[n]].double().cpu(), act_w[n].cpu())
    torch.testing.assert_close(with_dw2[3].double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rank, factor, mode",
    [
        (16, "B2", 1),  # lb [E, H, r], r contiguous
        (16, "A1", 2),  # lb read from A1 [E, r, H], H contiguous
        (32, "B2", 1),
        (8, "B2", 1),  # 16-byte rows in bf16: its block (16) reads zeros past r
        (24, "A1", 2),
        (4, "B2", 0),  # 8-byte rows of z: no TMA
        (12, "A1", 0),
    ],
)
def test_given_z_descriptors_only_for_16_byte_rows(monkeypatch, rank, factor, mode):
    experts, hidden, rows = 3, 64, 40
    a1 = torch.randn(experts, rank, hidden, dtype=torch.bfloat16)
    b2 = torch.randn(experts, hidden, rank, dtype=torch.bfloat16)
    lb, strides = (b2, b2.stride()) if factor == "B2" else (a1, tr._t(a1))
    z = torch.empty(rows, rank, dtype=torch.bfloat16)
    low = tr.LowRank(lb, strides, lb, strides, 2.0, z, tk.LORA_GIVEN)
    got, z_desc, lb_desc = tr._lora_descriptors(low, hidden)
    assert got == mode
    if mode:
        assert z_desc.base is low.z and lb_desc.base is lb
        assert lb_desc.shape == ([experts, hidden, rank] if mode == 1 else [experts, rank, hidden])
    monkeypatch.setattr(tr, "_tma_enabled", lambda: False)
    assert tr._lora_descriptors(low, hidden)[0] == 0


def test_rows_bucket_is_the_next_power_of_two():
    from moelab.kernels import triton_tuning as tuning

    assert [tuning.rows_bucket(n) for n in (1, 2, 3, 48, 64, 65, 8000 * 8)] == [
        1, 2, 4, 64, 64, 128, 65536
    ]  # fmt: skip


def test_tuning_keys_hold_the_row_bucket_not_the_row_count(monkeypatch):
    """Every tuned configuration and measured choice is keyed by the rows' bucket: a run whose
    token count changes within a bucket tunes and measures nothing new, and one in another
    bucket does (keys recorded with tuning switched on and the tuners themselves stubbed)."""
    from moelab.kernels import triton_tuning as tuning

    keys: list[tuple] = []
    gemm_keys: list[tuple] = []  # the tiled and persistent GEMMs', which tile rows

    def run_tuned(plain, tuned, key, *args, **kwargs):
        keys.append(key)
        if plain in (tk._expert_gemm_kernel, tk._persistent_gemm_kernel):
            gemm_keys.append(key)

    def measured_choice(store, what, key, run, device, kernels, candidates=()):
        keys.append(key)
        return (candidates or store.allowed)[0]

    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    monkeypatch.setattr(tuning, "measures", lambda a: True)
    monkeypatch.setattr(tuning, "run_tuned", run_tuned)
    monkeypatch.setattr(tuning, "measured_choice", measured_choice)
    monkeypatch.setattr(tr, "LORA_PLACEMENT", dict.fromkeys(tr.LORA_PLACEMENT))
    monkeypatch.setattr(tr, "DOWN_BACKWARD_MAIN", None)

    def keys_at(tokens: int) -> list[tuple]:
        keys.clear()
        gemm_keys.clear()
        case = Case("bucket", tokens=tokens, hidden=32, inter=16, experts=4, top_k=2)
        run_backend(make_problem(case, "all_trainable", torch.float32), "triton")
        return list(keys)

    # 2 * 17 = 34 and 2 * 30 = 60 rows share the bucket of 64; 2 * 40 = 80 rows do not
    at_17, at_30, at_40 = keys_at(17), keys_at(30), keys_at(40)
    assert len(at_17) >= 8  # GEMMs, rank-r products, and the measured choices
    assert at_17 == at_30
    # every key that holds rows moves to the next bucket (the rank-gradient kernel's has none)
    assert len(at_40) == len(at_30)
    for k30, k40 in zip(at_30, at_40):
        assert (k30 == k40) == (k30[0] == "expert_grad"), k30
    # 2 * 150 = 300 and 2 * 256 = 512 rows share the bucket of 512, but not the row-tile
    # heights worth timing (75 rows per expert: 64 only; 128 per expert: 64 and 128), so the
    # tuned launches differ (the measured choices, which only launch them, do not)
    at_150 = keys_at(150)
    gemms_150 = list(gemm_keys)
    at_256 = keys_at(256)
    assert gemms_150 and all((64,) in k for k in gemms_150)
    assert gemm_keys and all((64, 128) in k for k in gemm_keys)
    others = [[k for k in keys if k not in gemms] for keys, gemms in
              ((at_150, gemms_150), (at_256, gemm_keys))]  # fmt: skip
    assert others[0] == others[1] and others[0]


# which leaves train (the rest frozen), on the all-trainable problem: GPT-OSS's activation,
# biases and LoRA
FROZEN_SETS = {
    "x frozen, LoRA A1 only": {"lora_a1"},
    "x frozen, LoRA only": {"lora_a1", "lora_b1", "lora_a2", "lora_b2"},
    "LoRA B only, router": {"lora_b1", "lora_b2", "logits"},
    "router only": {"logits"},
    "x only": {"x"},
    "biases frozen, LoRA and x": {"x", "logits", "lora_a1", "lora_b1", "lora_a2", "lora_b2"},
    "base weights and x, LoRA frozen": {"x", "gate_up", "down", "gate_up_bias", "down_bias"},
}


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("trained", list(FROZEN_SETS))
def test_partly_frozen_leaves_match_reference(monkeypatch, trained, recompute):
    """Every gradient that is asked for, as float64, whichever leaves are frozen; with x frozen
    the dX product does not run (only A1's rank-r product, where A1 trains)."""
    p = make_problem(Case("frozen", tokens=30, hidden=32, inter=24, experts=5, top_k=2, cold=(1,)),
                     "all_trainable", torch.float32, seed=5)  # fmt: skip
    for name, leaf in trainables(p).items():
        leaf.requires_grad_(name in FROZEN_SETS[trained])
    hidden = p["x"].shape[1]
    dx_products = []
    gemm = tr.expert_gemm

    def counting(a, w, w_strides, n_out, *args, **kwargs):
        if n_out == hidden and kwargs.get("scatter") is not None:
            dx_products.append(n_out)  # the forward's down projection, and dX
        return gemm(a, w, w_strides, n_out, *args, **kwargs)

    monkeypatch.setattr(tr, "expert_gemm", counting)
    grads = _check_against_reference(p, recompute)
    assert set(grads) == FROZEN_SETS[trained]
    assert len(dx_products) == (2 if "x" in FROZEN_SETS[trained] else 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_tokens_give_an_empty_output_and_zero_gradients(variant):
    p = make_problem(Case("T=0", tokens=0), variant, torch.float32)
    out, grads = run_backend(p, "triton")
    assert out.shape == (0, p["x"].shape[1])
    named = trainables(p)
    assert set(grads) == set(named)
    for name, grad in grads.items():
        assert grad.shape == named[name].shape and not grad.any(), name


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "tokens, width, rows",
    [(1, 8, 1), (16, 512, 64), (13, 200, 37), (40, 300, 0), (5, 1024, 9)],
    ids=["one row", "even blocks", "partial row and column blocks", "no rows", "repeats"],
)
def test_gather_rows_copies_the_indexed_rows(dtype, index_dtype, tokens, width, rows):
    """``tg.gather_rows``: row n of the copy is row index[n] of the source, bit for bit, with
    row and column counts that fill whole blocks or not, repeated and unordered indices, none,
    a source row stride wider than its width, strided ids, int64 (the dispatch plan's) or int32."""
    torch.manual_seed(5)
    wide = torch.randn(tokens, width + 24).to(TEST_DEVICE, dtype)
    src = wide[:, :width]  # stride(0) = width + 24
    index = torch.randint(0, tokens, (2 * rows,), device=TEST_DEVICE, dtype=index_dtype)[::2]
    got = tg.gather_rows(src, index)
    assert got.shape == (rows, width) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, src.cpu()[index.cpu()].to(TEST_DEVICE))
