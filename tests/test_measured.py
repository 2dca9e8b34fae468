"""Measured choices kept on disk: stored once, reused by later processes, never half-written."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import stat

import pytest
import torch
from conftest import TEST_DEVICE
from test_experts import Case, make_problem, run_backend

from moelab import files
from moelab.kernels import launch as kl
from moelab.kernels import measured
from moelab.kernels import triton as tr
from moelab.kernels import triton_kernels as tk
from moelab.kernels import triton_tuning as tuning
from moelab.kernels.measured import MeasuredChoices


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_choice_is_measured_once_and_read_back_by_a_new_process(cache):
    calls = []

    def measure():
        calls.append(1)
        return 2

    assert MeasuredChoices("c.json", (1, 2)).get("gpu a", "k1", measure) == 2
    assert MeasuredChoices("c.json", (1, 2)).get("gpu a", "k1", measure) == 2  # a "new process"
    assert len(calls) == 1
    assert (
        MeasuredChoices("c.json", (1, 2)).get("gpu b", "k1", lambda: 1) == 1
    )  # other scope: measured
    assert json.loads((cache / "c.json").read_text()) == {"gpu a": {"k1": 2}, "gpu b": {"k1": 1}}
    # no temporary files left; the writers' lock file stays (removing it would race)
    assert sorted(p.name for p in cache.iterdir()) == ["c.json", "c.json.lock"]


def test_a_corrupt_file_is_ignored_and_replaced(cache):
    cache.mkdir()
    (cache / "c.json").write_text("{not json")
    assert MeasuredChoices("c.json", (1, 2)).get("s", "k", lambda: 1) == 1
    assert json.loads((cache / "c.json").read_text()) == {"s": {"k": 1}}


@pytest.mark.parametrize("scope_value", [[], "oops", 3])
def test_a_file_of_another_layout_is_ignored_and_replaced(cache, scope_value):
    cache.mkdir()
    (cache / "c.json").write_text(json.dumps({"s": scope_value, "t": {"k": 2}}))
    assert MeasuredChoices("c.json", (1, 2)).get("s", "k", lambda: 1) == 1
    assert json.loads((cache / "c.json").read_text()) == {"s": {"k": 1}, "t": {"k": 2}}


def _store_choices(args: tuple[str, int]) -> None:
    folder, worker = args
    os.environ["MOELAB_CACHE_DIR"] = folder
    for i in range(60):
        MeasuredChoices("c.json", (1, 2)).get("s", f"w{worker}-k{i}", lambda i=i: 1 + i % 2)


def test_processes_measuring_at_once_keep_each_others_choices(cache):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_store_choices, [(str(cache), w) for w in range(4)])
    stored = json.loads((cache / "c.json").read_text())["s"]
    assert len(stored) == 240 and stored["w3-k59"] == 2


def test_the_stored_file_is_as_readable_as_any_file_this_process_creates(cache):
    MeasuredChoices("c.json", (1, 2)).get("s", "k", lambda: 1)
    assert stat.S_IMODE((cache / "c.json").stat().st_mode) == 0o666 & ~files.UMASK


def test_a_failed_write_leaves_no_temporary_file(cache, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    assert MeasuredChoices("c.json", (1, 2)).get("s", "k", lambda: 2) == 2
    assert sorted(p.name for p in cache.iterdir()) == ["c.json.lock"]


def test_the_cache_folder_expands_home_and_is_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOELAB_CACHE_DIR", "~/mc")
    assert measured.cache_dir() == tmp_path / "mc"
    monkeypatch.setenv("MOELAB_CACHE_DIR", "rel/mc")
    monkeypatch.chdir(tmp_path)
    assert measured.cache_dir() == tmp_path / "rel" / "mc"


def test_an_unwritable_cache_only_costs_measuring_again(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(blocker / "cache"))  # a file in the way
    choices = MeasuredChoices("c.json", (1, 2))
    assert choices.get("s", "k", lambda: 2) == 2
    assert choices.get("s", "k", lambda: 1) == 2  # remembered in memory


def test_an_unknown_stored_value_is_measured_again(cache):
    cache.mkdir()
    (cache / "c.json").write_text(json.dumps({"s": {"k": 7}}))
    assert MeasuredChoices("c.json", (1, 2)).get("s", "k", lambda: 1) == 1


def test_triton_choices_go_through_the_disk_cache(cache, monkeypatch):
    """The backend's measured LoRA placements and down-projection backward main loop (timed on
    CUDA; faked here: always the last candidate) are stored per machine and product, and a
    fresh process reuses them without timing again; within a process, a repeated ask skips the
    store's text keys."""
    timed = []
    monkeypatch.setattr(tuning, "measures", lambda a: True)
    monkeypatch.setattr(tuning, "scope", lambda device, kernels: "test machine")
    monkeypatch.setattr(tuning, "fastest", lambda run, choices: timed.append(1) or choices[-1])

    def fresh_process():
        monkeypatch.setattr(
            tr, "_placements", MeasuredChoices("triton_lora_placement.json", tr._placements.allowed)
        )
        monkeypatch.setattr(tr, "_main_loops", MeasuredChoices("triton_down_backward.json",
                                                               tr._main_loops.allowed))  # fmt: skip

    fresh_process()
    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2)
    p = make_problem(case, "lora", torch.float32, seed=15)
    run_backend(p, "triton")
    placements = json.loads((cache / "triton_lora_placement.json").read_text())["test machine"]
    mains = json.loads((cache / "triton_down_backward.json").read_text())["test machine"]
    # up, down, bwd_up; bwd_down's z comes with the torch main loop (a rank-r launch)
    assert set(placements.values()) == {tk.LORA_GIVEN} and len(placements) == 3
    assert list(mains.values()) == ["torch"]
    assert len(timed) == 4
    for store in (tr._placements, tr._main_loops):  # the same process asks at every launch:
        monkeypatch.setattr(store, "get", None)  # answered by the caller's keys, no text keys
    run_backend(p, "triton")
    fresh_process()
    run_backend(p, "triton")
    assert len(timed) == 4


def test_torch_main_loop_is_not_considered_above_its_memory_bound(cache, monkeypatch):
    """Where the torch main loop's transient copies would exceed the bound, it is not among
    the candidates timed (long sequences keep the other paths' memory)."""
    timed = []
    monkeypatch.setattr(tuning, "measures", lambda a: True)
    monkeypatch.setattr(tuning, "scope", lambda device, kernels: "test machine")
    monkeypatch.setattr(
        tuning, "fastest", lambda run, choices: timed.append(choices) or choices[-1]
    )
    monkeypatch.setattr(tr, "_main_loops", MeasuredChoices("main.json", tr._main_loops.allowed))
    monkeypatch.setattr(tr, "_TORCH_MAIN_LOOP_MAX_BYTES", 0)
    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2)
    run_backend(make_problem(case, "lora", torch.float32, seed=15), "triton")
    assert ("triton", "gathered") in timed
    assert not any("torch" in choices for choices in timed)
    assert "gathered" in (cache / "main.json").read_text()


def test_full_fine_tunes_main_loop_is_timed_with_dw2(cache, monkeypatch):
    """In full fine-tune the down projection's weight gradient is part of what each main loop
    is timed on: the torch loop hands dW2 its gathered dout, the others leave dW2 to gather its
    own, and timing the loops alone chose a loop whose copy of dout dW2 then made anyway."""
    from moelab.kernels import triton_grads as tg

    timed = {}
    monkeypatch.setattr(tuning, "measures", lambda a: True)
    monkeypatch.setattr(tuning, "scope", lambda device, kernels: "test machine")
    weight_grad = tg.weight_grad
    calls = []
    monkeypatch.setattr(tg, "weight_grad", lambda *a, **k: calls.append(k) or weight_grad(*a, **k))

    def fastest(run, choices):
        handed = {}
        for choice in choices:
            before = len(calls)
            run(choice)
            handed[choice] = [k.get("gathered_ND") is not None for k in calls[before:]]
        timed[choices] = handed
        return choices[0]

    monkeypatch.setattr(tuning, "fastest", fastest)
    monkeypatch.setattr(tr, "_main_loops", MeasuredChoices("main.json", tr._main_loops.allowed))
    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2)
    run_backend(make_problem(case, "full", torch.float32, seed=15), "triton")
    # dW2 once per main loop timed, on the gathered copy where the torch loop made one
    mains = timed[tr._main_loops.allowed]
    assert mains == {"triton": [False], "gathered": [False], "torch": [True]}
    key = next(iter(json.loads((cache / "main.json").read_text())["test machine"]))
    assert key.endswith("True, False)")  # the key tells full fine-tune's timing apart


def test_main_loop_timed_with_an_in_place_dw2_adds_into_a_scratch_copy(cache, monkeypatch):
    """With down's gradient added into its .grad in place (gradient accumulation), each main
    loop is timed adding into a scratch copy: the real .grad gets one addition, and the key
    tells this timing apart."""
    from conftest import TOLERANCE, rel_err
    from test_experts import routing_of, run_reference

    from moelab.kernels import triton_grads as tg
    from moelab.ops import moe_experts

    timed = []
    monkeypatch.setattr(tuning, "measures", lambda a: True)
    monkeypatch.setattr(tuning, "scope", lambda device, kernels: "test machine")
    added = []
    add_weight_grad = tg.add_weight_grad
    monkeypatch.setattr(
        tg, "add_weight_grad", lambda g, *a: added.append(g) or add_weight_grad(g, *a)
    )

    def fastest(run, choices):
        for choice in choices:
            run(choice)
        timed.append(choices)
        return choices[0]

    monkeypatch.setattr(tuning, "fastest", fastest)
    monkeypatch.setattr(tr, "_main_loops", MeasuredChoices("main.json", tr._main_loops.allowed))
    case = Case("wide", tokens=40, hidden=64, inter=48, experts=5, top_k=2)
    p = make_problem(case, "full", torch.float32, seed=16)
    _, ref = run_reference(p, routing_of(p).experts)
    down = p["down"]
    old = torch.randn(down.shape, device=down.device) * float(ref["down"].abs().mean())
    down.grad = old.clone()
    out = moe_experts(p["x"], routing_of(p), p["gate_up"], down, activation=p["activation"],
                      backend="triton")  # fmt: skip
    out.backward(p["dout"])
    assert timed == [tr._main_loops.allowed]
    into_down = [g for g in added if g.shape == down.shape]
    assert len(into_down) == 4 and sum(g is down.grad for g in into_down) == 1  # 3 timed, 1 real
    assert rel_err(down.grad - old, ref["down"]) <= TOLERANCE[torch.float32]
    key = next(iter(json.loads((cache / "main.json").read_text())["test machine"]))
    assert key.endswith("True, True)")


class _FakeKernel:
    """Records ``kernel[grid](*args, **kwargs)`` launches; ``best_config``, ``configs`` and the
    candidate pruning as Triton's tuner; ``fn.warmup`` (compiling without launching) recorded
    in ``warmups``."""

    def __init__(self, calls: list, name: str, best=None, configs=(), arg_names=()):
        self.calls, self.name, self.best_config = calls, name, best
        self.configs = list(configs) or [best]
        self.arg_names, self.nargs, self.fn, self.warmups = list(arg_names), None, self, []
        self.cache, self.cached_at_launch = {}, []  # the tuner's results by its own key

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.cached_at_launch.append(dict(self.cache))
            self.calls.append((self.name, grid, args, kwargs))

        return launch

    def prune_configs(self, kwargs):
        # as a tuner's early_config_prune: sees the launch's named arguments
        return [c for c in self.configs if self.nargs.get("n", 0) >= c.kwargs["BLOCK_N"]]

    def warmup(self, *args, grid, **kwargs):
        self.warmups.append((grid, args, kwargs))


@pytest.fixture
def compile_threads(moelab_setting):
    """Sets ``MOELAB_TRITON_COMPILE_THREADS`` for one test."""
    return functools.partial(moelab_setting, "MOELAB_TRITON_COMPILE_THREADS")


def test_a_first_tuning_compiles_the_pruned_candidates_first(compile_threads):
    """Before the tuner times them, every candidate left by its pruning is compiled (warmed up
    with the launch's arguments, flags and the candidate's constexprs), each after its own
    pre-hook, which sizes the descriptors whose boxes are part of the compiled signature."""
    import triton

    compile_threads("4")
    seen = []  # (the pre-hook's view of BLOCK_N, the warmups so far)
    calls = []
    configs = [
        triton.Config({"BLOCK_N": n}, num_warps=4, num_stages=3, pre_hook=lambda nargs: seen.append(
            (nargs["BLOCK_N"], nargs["F"], nargs["n"], len(tuned.warmups))))
        for n in (32, 64, 128)
    ]  # fmt: skip
    tuned = _FakeKernel(calls, "tuned", configs[0], configs, arg_names=("x", "n"))
    assert tuning.compile_candidates(tuned, (4,), ("x", 64), {"F": True}) == 2  # 128 > n: pruned
    assert seen == [(32, True, 64, 0), (64, True, 64, 1)]
    assert [w[2]["BLOCK_N"] for w in tuned.warmups] == [32, 64]
    assert all(w[0] == (4,) and w[1] == ("x", 64) and w[2]["F"] is True for w in tuned.warmups)
    assert tuned.warmups[0][2]["num_warps"] == 4 and tuned.nargs is None
    assert not calls  # compiled, nothing launched

    compile_threads("1")  # one by one: left to the tuner
    assert tuning.compile_candidates(tuned, (4,), ("x", 64), {"F": True}) == 0
    assert len(tuned.warmups) == 2
    compile_threads("0")
    with pytest.raises(ValueError, match="MOELAB_TRITON_COMPILE_THREADS='0'"):
        tuning.compile_candidates(tuned, (4,), ("x", 64), {"F": True})


@pytest.fixture
def jit_launches(monkeypatch):
    """Launches through the JIT (as under the CPU interpreter) on any machine: the fake
    kernels record calls and compile nothing for the GPU's direct path to keep."""
    monkeypatch.setattr(kl, "interpreting", lambda: True)


def test_a_tuned_launch_key_later_goes_straight_to_the_plain_kernel(jit_launches, monkeypatch):
    import triton

    monkeypatch.setattr(tuning, "_chosen", {})
    calls = []
    best = triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3)
    plain, tuned = _FakeKernel(calls, "plain"), _FakeKernel(calls, "tuned", best)

    def derived(config):
        return {"EVEN": config["BLOCK_N"] == 128}

    for _ in range(3):
        tuning.run_tuned(plain, lambda: tuned, ("k", 1), (4,), (1, 2), {"F": True}, derived)
    tuning.run_tuned(plain, lambda: tuned, ("k", 2), (4,), (1, 2), {"F": False}, derived)
    assert [c[0] for c in calls] == ["tuned", "plain", "plain", "tuned"]
    name, grid, args, kwargs = calls[1]
    assert grid == (4,) and args == (1, 2)
    assert kwargs["F"] is True and kwargs["BLOCK_N"] == 128 and kwargs["EVEN"] is True
    assert kwargs["num_warps"] == 8 and kwargs["num_stages"] == 3
    assert calls[0][3] == {"F": True}  # the tuner itself picks the configuration


def test_each_new_launch_key_is_tuned_afresh(jit_launches, monkeypatch):
    """The launch key (with its row bucket) decides when to tune: the tuner's results kept by
    its own, coarser key (the in-place weight gradient's has no row count) are dropped before
    it runs, so a second row bucket of one shape is timed instead of taking the first's choice
    untimed."""
    import triton

    monkeypatch.setattr(tuning, "_chosen", {})
    calls = []
    plain = _FakeKernel(calls, "plain")
    tuned = _FakeKernel(calls, "tuned", triton.Config({"BLOCK_N": 64}))
    for bucket in (1024, 2048):
        tuned.cache[("a_dim", "b_dim")] = "the choice of the bucket before"
        tuning.run_tuned(plain, lambda: tuned, ("k", bucket), (4,), (1,), {})
    assert [c[0] for c in calls] == ["tuned", "tuned"]
    assert tuned.cached_at_launch == [{}, {}]


def test_a_cached_launch_boxes_this_calls_descriptors_for_the_chosen_configuration(
    jit_launches, monkeypatch
):
    """The tuner's pre-hook sizes the boxes only while tuning; later launches get fresh
    descriptors (one per call), which the cached path must box the same way."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(tuning, "_chosen", {})
    calls = []
    best = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16})
    plain, tuned = _FakeKernel(calls, "plain"), _FakeKernel(calls, "tuned", best)
    flags = {"W_DESC": 2, "EPILOGUE": tk.STORE}
    tuning.run_tuned(plain, lambda: tuned, ("k",), (4,), (), flags)
    w, a = torch.zeros(3, 32, 64), torch.zeros(80, 32)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, 1, 1])
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1])
    descriptors = dict(w_desc=w_desc, a_desc=a_desc)

    def prepare(kwargs):  # as the GEMM launchers pass it
        tr._fit_boxes(dict(kwargs, **descriptors))

    tuning.run_tuned(plain, lambda: tuned, ("k",), (4,), (), flags, prepare=prepare)
    assert [c[0] for c in calls] == ["tuned", "plain"]
    assert w_desc.block_shape == [1, 16, 32]  # [E, K, N] box: (1, BLOCK_K, BLOCK_N)
    assert a_desc.block_shape == [64, 16]  # (BLOCK_M, BLOCK_K)


class _FakeCompiled:
    """A compiled kernel's launch surface: its launcher ``run`` (recorded "direct") and
    ``[grid](*all_args)`` (recorded "runner", the path taken under a profiler's hooks)."""

    function, packed_metadata = 7, "meta"

    def __init__(self, calls: list):
        self.calls = calls
        self.run = lambda *a: self.calls.append(("direct", a[:3], a[3:9], a[9:]))

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("runner", grid, args))


class _FakeJit:
    """A JIT function's launch surface: ``kernel[grid](*args, **kwargs)`` binds, specialises
    and launches (recorded "jit"), returning the compiled kernel."""

    arg_names = ["t", "n", "BLOCK"]

    def __init__(self, calls: list):
        self.calls = calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.calls)

        return launch


def test_host_block_arithmetic_matches_tritons():
    """``kl.cdiv`` and ``kl.next_power_of_2`` stand in for Triton's host helpers (constexpr
    functions with a slow wrapper): the same values, zero and exact powers included."""
    import triton

    for n in [*range(0, 1100), 2**20 - 1, 2**20, 2**20 + 1]:
        assert kl.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128, 1000):
            assert kl.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_argument_specialisation_tells_bools_ints_and_floats_apart():
    """Python finds ``True == 1 == 1.0`` (and hashes them alike), but Triton compiles an i1, an
    i32 and an fp32 argument into different kernels: each needs its own compiled launcher."""
    specs = {kl.arg_spec((v,)) for v in (True, 1, 1.0)}
    assert len(specs) == 3


def test_argument_specialisation_keys_ints_as_triton_specialises_them():
    """Two ints ``arg_spec`` keys alike must be ints Triton compiles alike (else a launch would
    run a kernel specialised for another value), checked against Triton's own specialisation;
    and i32 ints above 1 are keyed by divisibility by 16, not by value, so a new token count
    reuses a compiled launcher instead of going through the JIT again."""
    specialize = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    ints = [-(2**40), -17, -16, -1, 0, 1, 2, 3, 15, 16, 17, 32, 48, 65535, 65536, 2**31 - 1]
    ints += [2**31, 2**31 + 16, 2**32, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1]
    floats = [0.5, 2.0, -1.0, 1e30]
    values = [*ints, *floats, True, False]

    def tritons(v):
        return specialize(BaseBackend, v, False, True, True)

    for a in values:
        for b in values:
            if type(a) is type(b) and kl.arg_spec((a,)) == kl.arg_spec((b,)):
                assert tritons(a) == tritons(b), (a, b)
    assert kl.arg_spec((32,)) == kl.arg_spec((48,)) == kl.arg_spec((65536,))
    assert kl.arg_spec((17,)) == kl.arg_spec((8193,)) != kl.arg_spec((1,))
    assert len({kl.arg_spec((n,)) for n in range(2, 100_000)}) == 2
    assert kl.arg_spec((0.5,)) == kl.arg_spec((2.0,))
    assert kl.arg_spec((True,)) == kl.arg_spec((False,))
    t = torch.zeros(16)
    assert kl.arg_spec((t,)) == kl.arg_spec((torch.ones(8),)) != kl.arg_spec((t[1:],))
    assert kl.arg_spec((t,)) != kl.arg_spec((t.double(),))


def test_launch_refuses_a_constexpr_by_position_or_a_runtime_argument_by_keyword():
    """Positional arguments are keyed by kind, not value, and the constexprs of a launch's
    first call are kept for the direct launches after it: a kernel given a constexpr by
    position, or a runtime argument by keyword, is refused before anything runs (a real
    kernel, under the interpreter as on the GPU)."""
    y, w = torch.ones(4, 8, device=TEST_DEVICE), torch.ones(4, device=TEST_DEVICE)
    out = torch.full((2, 8), float("nan"), device=TEST_DEVICE)
    runtime = (y, w, out, 8, 8, 8)
    sizes = dict(HAS_W=True, UPCAST=kl.interpreting(), BLOCK_H=8)
    kl.launch(tk._combine_kernel, (2,), runtime, dict(sizes, TOP_K=2), ("combine",))
    assert torch.equal(out.cpu(), torch.full((2, 8), 2.0))  # the launch ran: two slots of ones
    with pytest.raises(ValueError, match="constexprs by keyword"):
        kl.launch(tk._combine_kernel, (2,), (*runtime, 2), sizes, ("combine", "TOP_K first"))
    with pytest.raises(ValueError, match="runtime arguments by position"):
        kl.launch(tk._combine_kernel, (2,), runtime[:-1], dict(sizes, TOP_K=2, stride_o=8),
                  ("combine", "stride by name"))  # fmt: skip


def test_launches_after_the_first_go_straight_to_the_compiled_kernel(monkeypatch):
    """The same key with the same argument specialisation launches the compiled kernel's
    launcher (grid evaluated, current stream, no hooks, all arguments in order), also for an
    int Triton specialises alike; an int it specialises apart, a misaligned tensor, another
    dtype, another key or another current device goes through the JIT again; with a profiler's
    launch hook set, the compiled kernel's own runner launches."""
    monkeypatch.setattr(kl, "interpreting", lambda: False)
    monkeypatch.setattr(kl, "_compiled", {})
    device = [0]
    monkeypatch.setattr(kl, "_current_device", lambda: device[0])
    monkeypatch.setattr(kl, "_raw_stream", lambda d: 1234 + d)
    calls = []
    kernel = _FakeJit(calls)
    t = torch.zeros(16)

    def launch(t, n, key=("k",)):
        kl.launch(kernel, lambda meta: (meta["BLOCK"] * 2,), (t, n), {"BLOCK": 4}, key)

    launch(t, 32)
    launch(torch.ones(16), 32)  # another tensor of the same dtype and alignment
    launch(t, 33)
    launch(t[1:], 32)
    launch(t.double(), 32)
    launch(t, 32, key=("other",))
    launch(t, 33)
    launch(t, 4096)  # another count that Triton specialises alike (divisible by 16, i32)
    assert [c[0] for c in calls] == [
        "jit",
        "direct",
        "jit",
        "jit",
        "jit",
        "jit",
        "direct",
        "direct",
    ]
    assert calls[0][2:] == ((t, 32), {"BLOCK": 4})
    grid, fixed, args = calls[1][1:]
    assert grid == (8, 1, 1) and fixed == (1234, 7, "meta", None, None, None)
    assert args[1:] == (32, 4) and torch.equal(args[0], torch.ones(16))
    device[0] = 1  # another device: its own compiled kernel, its own stream
    launch(t, 33)
    launch(t, 33)
    assert [c[0] for c in calls[-2:]] == ["jit", "direct"] and calls[-1][2][0] == 1235
    device[0] = 0
    monkeypatch.setattr(kl.triton_knobs.runtime, "launch_exit_hook", lambda *a: None)
    launch(t, 33)
    assert calls[-1][0] == "runner" and calls[-1][1] == (8, 1, 1) and calls[-1][2] == (t, 33, 4)


def test_a_tuned_configuration_is_kept_on_disk_for_later_processes(
    jit_launches, monkeypatch, tmp_path
):
    """Triton's own results cache skips configurations with a pre-hook (every GEMM's): the
    choice per launch key is kept in moelab's cache, so a new process (empty ``_chosen``)
    launches the stored configuration without tuning; a stored name no longer among the
    kernel's configurations, or another scope, is tuned again."""
    import triton

    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "scope", lambda device, kernels: f"fake GPU {device} {kernels}")
    small = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3)
    big = triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3)
    calls = []
    plain = _FakeKernel(calls, "plain")
    tuned = _FakeKernel(calls, "tuned", big, configs=(small, big))

    def run(device: str) -> None:
        tuning.run_tuned(plain, lambda: tuned, ("k", 1), (4,), (1,), {"F": 1}, device=device)

    monkeypatch.setattr(tuning, "_chosen", {})
    run("cpu")
    assert [c[0] for c in calls] == ["tuned"]
    assert "BLOCK_N=128" in (tmp_path / tuning.TUNED_CONFIGS).read_text()

    monkeypatch.setattr(tuning, "_chosen", {})  # a new process
    tuned.best_config = small  # what the tuner would pick now: not asked
    calls.clear()
    run("cpu")
    assert [c[0] for c in calls] == ["plain"]
    assert calls[0][3]["BLOCK_N"] == 128 and calls[0][3]["num_warps"] == 8

    monkeypatch.setattr(tuning, "_chosen", {})  # another GPU: tuned again
    calls.clear()
    run("meta")
    assert [c[0] for c in calls] == ["tuned"]

    monkeypatch.setattr(tuning, "_chosen", {})  # the stored configuration left the kernel's list
    tuned.configs = [small]
    calls.clear()
    run("cpu")
    assert [c[0] for c in calls] == ["tuned"]
