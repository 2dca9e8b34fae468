"""LoRA edges the training tests leave out: target subsets, rank 1, odd alpha/rank scales,
separate gate/up on GPT-OSS, fewer layers; checked against a float64 merge by hand, the merged
model's forward (also after save_pretrained), a bit-exact adapter round trip and PEFT."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import rel_err
from hf_fixtures import gpt_oss_model, load_reference, qwen3_model
from safetensors.torch import load_file, save_file

import moelab
from moelab.models import tree
from moelab.models.options import ForwardOptions
from moelab.ops.lora import is_adapter
from moelab.train import lora as lora_mod
from moelab.train import setup
from moelab.train.config import LoraConfig

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny hub checkpoints, written once: (family, layers) -> folder."""
    root, made = tmp_path_factory.mktemp("bases"), {}

    def get(family: str, layers: int):
        if (family, layers) not in made:
            folder = root / f"{family}_{layers}"
            build = qwen3_model if family == "qwen3" else gpt_oss_model
            build(num_hidden_layers=layers).save_pretrained(folder)
            made[family, layers] = folder
        return made[family, layers]

    return get


def with_adapters(folder, cfg: LoraConfig, seed: int = 1):
    """The checkpoint with adapters on ``cfg.targets``, every adapter (B too) drawn nonzero."""
    model = moelab.load_pretrained(folder)
    assert lora_mod.add_lora(model.params, cfg) > 0
    g = torch.Generator().manual_seed(seed)
    for path, t in tree.leaves(model.params):
        if is_adapter(path) or (path[-3:-1] == ("mlp", "router") and "router" in cfg.targets):
            t.data.add_(0.3 * torch.randn(t.shape, generator=g))
    return model


def hand_merged(params: dict, scale: float) -> dict[tuple, torch.Tensor]:
    """W + scale * B A in float64 for every adapted weight, from the adapters as stored."""
    out = {}
    for path, _ in tree.leaves(params):
        if path[-1] == "lora_a":
            o = tree.get(params, path[:-1])
            delta = o["lora_b"].double() @ o["lora_a"].double()
            out[(*path[:-1], "weight")] = o["weight"].double() + scale * delta
        elif path[-1] in ("gate_up_a", "gate_a"):
            experts = tree.get(params, path[:-2])
            lo = experts["lora"]

            def ba(b, a, lo=lo):
                return torch.einsum("eor,eri->eoi", lo[b].double(), lo[a].double())

            if "gate_up_a" in lo:
                gate_up = ba("gate_up_b", "gate_up_a")
            else:  # gate rows first, then up rows (the canonical order in params)
                gate_up = torch.cat([ba("gate_b", "gate_a"), ba("up_b", "up_a")], dim=1)
            base = path[:-2]
            out[(*base, "gate_up")] = experts["gate_up"].double() + scale * gate_up
            out[(*base, "down")] = experts["down"].double() + scale * ba("down_b", "down_a")
    return out


CASES = [
    # family, layers, targets, rank, alpha, gate_up
    ("qwen3", 3, ["attention"], 1, 16.0, "fused"),
    ("qwen3", 3, ["experts"], 1, 3.0, "fused"),
    ("qwen3", 3, ["experts"], 2, 3.0, "separate"),
    ("qwen3", 3, ["attention"], 4, 2.0, "separate"),
    ("qwen3", 2, ["experts", "router"], 3, 0.5, "separate"),
    ("gpt_oss", 4, ["experts"], 1, 16.0, "separate"),
    ("gpt_oss", 2, ["experts", "attention", "router"], 3, 5.0, "separate"),
    ("gpt_oss", 2, ["attention"], 2, 1.0, "fused"),
    ("gpt_oss", 1, ["experts", "router"], 1, 1.0, "fused"),
]


@pytest.mark.parametrize(
    "family, layers, targets, rank, alpha, gate_up",
    CASES,
    ids=["-".join(map(str, c)) for c in CASES],
)
def test_adapters_merge_round_trip_and_load_in_peft(
    bases, tmp_path, family, layers, targets, rank, alpha, gate_up
):
    folder = bases(family, layers)
    cfg = LoraConfig(rank=rank, alpha=alpha, targets=targets, gate_up=gate_up)
    model = with_adapters(folder, cfg)
    scale = alpha / rank
    expected = model(IDS, options=ForwardOptions(lora_scale=scale))
    assert rel_err(expected, moelab.load_pretrained(folder)(IDS)) > 1e-3  # adapters matter

    # merged weights = W + s B A by hand; the merged model's forward = the adapters' forward
    merged = lora_mod.merged(model.params, scale)
    by_hand = hand_merged(model.params, scale)
    assert by_hand
    for path, want in by_hand.items():
        assert rel_err(tree.get(merged, path), want) <= 1e-6, path
    assert not any(is_adapter(p) for p, _ in tree.leaves(merged))
    merged_model = moelab.Model(model.family, model.config, merged)
    assert rel_err(merged_model(IDS), expected) <= 2e-5
    moelab.save_pretrained(merged_model, tmp_path / "merged")
    assert rel_err(moelab.load_pretrained(tmp_path / "merged")(IDS), expected) <= 2e-5

    # export and import: the same forward (fused adapters and a router: bit for bit)
    layout = setup.adapter_layout(model)
    lora_mod.save_adapter(model.params, layout, cfg, tmp_path / "adapter")
    fresh = moelab.load_pretrained(folder)
    loaded = lora_mod.load_adapter(fresh.params, setup.adapter_layout(fresh), tmp_path / "adapter")
    assert loaded.alpha / loaded.rank == pytest.approx(scale, rel=1e-15)
    got = fresh(IDS, options=ForwardOptions(lora_scale=loaded.alpha / loaded.rank))
    # separate gate/up come back fused at rank 2r (zero-padded): only the rounding may differ
    assert rel_err(got, expected) <= (1e-5 if gate_up == "separate" else 0.0)
    for path, t in tree.leaves(model.params):
        if (gate_up == "fused" and is_adapter(path)) or path[-3:-1] == ("mlp", "router"):
            assert torch.equal(tree.get(fresh.params, path), t), path

    peft = pytest.importorskip("peft")
    with_adapter = peft.PeftModel.from_pretrained(load_reference(folder), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(with_adapter(IDS).logits, expected) <= 2e-5


def test_adapter_layout_of_a_qwen3_model_that_carries_expert_adapters(bases):
    """adapter_layout after add_lora (as save_adapter's caller has it) equals the bare model's;
    the fused ADAPTER_LAYOUT used to look an experts dict's "lora" key up as a hub name."""
    folder = bases("qwen3", 3)
    cfg = LoraConfig(rank=2, targets=["experts", "attention"])
    model = with_adapters(folder, cfg)
    bare = setup.adapter_layout(moelab.load_pretrained(folder))
    assert setup.adapter_layout(model) == bare


def test_load_adapter_reports_what_the_adapter_holds_and_re_saves_it_unchanged(bases, tmp_path):
    """The LoraConfig load_adapter returns names the adapter's targets (a trained router too),
    so saving the loaded params with it writes every tensor of the original, bit for bit."""
    folder = bases("gpt_oss", 2)
    for targets in (["experts", "attention", "router"], ["attention"], ["experts"]):
        cfg = LoraConfig(rank=2, alpha=4.0, targets=targets)
        model = with_adapters(folder, cfg)
        layout = setup.adapter_layout(model)
        lora_mod.save_adapter(model.params, layout, cfg, tmp_path / "first")
        fresh = moelab.load_pretrained(folder)
        loaded = lora_mod.load_adapter(fresh.params, layout, tmp_path / "first")
        assert sorted(loaded.targets) == sorted(targets)
        lora_mod.save_adapter(fresh.params, layout, loaded, tmp_path / "again")
        first = load_file(tmp_path / "first" / "adapter_model.safetensors")
        again = load_file(tmp_path / "again" / "adapter_model.safetensors")
        assert first.keys() == again.keys()
        assert all(torch.equal(first[k], again[k]) for k in first)


def test_dense_mlp_adapters_without_the_experts_either_load_in_peft_or_warn(
    bases, tmp_path, caplog
):
    """PEFT maps gate_proj/up_proj/down_proj in target_modules onto a Qwen3-MoE's experts
    whether the experts are adapted or not; an export PEFT cannot reproduce must say so."""
    folder = bases("qwen3", 3)  # layer 1 is a dense MLP
    cfg = LoraConfig(rank=2, alpha=7.0, targets=["attention", "mlp"])
    model = with_adapters(folder, cfg)
    expected = model(IDS, options=ForwardOptions(lora_scale=cfg.alpha / cfg.rank))
    with caplog.at_level(logging.WARNING, logger="moelab"):
        lora_mod.save_adapter(model.params, setup.adapter_layout(model), cfg, tmp_path / "a")
    warned = "PEFT (0.21) takes gate_proj" in caplog.text
    peft = pytest.importorskip("peft")
    with_adapter = peft.PeftModel.from_pretrained(load_reference(folder), tmp_path / "a")
    with torch.no_grad():
        matches = rel_err(with_adapter(IDS).logits, expected) <= 2e-5
    assert matches or warned


OVER = [
    # family, targets and gate/up layout of adapter A in the params, targets of B loaded over it
    ("qwen3", ["experts", "attention"], "separate", ["experts"]),  # A's attention stayed
    ("qwen3", ["experts"], "separate", ["experts"]),  # A's gate/up stayed beside B's gate_up
    ("qwen3", ["experts", "mlp"], "fused", ["attention"]),  # A's experts and dense MLP stayed
    ("gpt_oss", ["experts", "attention"], "separate", ["experts", "router"]),
    ("gpt_oss", ["experts", "router"], "fused", ["attention", "router"]),  # B's router wins
    ("gpt_oss", ["attention"], "fused", ["experts"]),
]


def _adapters(model) -> dict[tuple, torch.Tensor]:
    return {path: t for path, t in tree.leaves(model.params) if is_adapter(path)}


@pytest.mark.parametrize(
    "family, a_targets, a_gate_up, b_targets", OVER, ids=["-".join(map(str, c)) for c in OVER]
)
def test_an_adapter_loaded_over_another_replaces_it(
    bases, tmp_path, family, a_targets, a_gate_up, b_targets
):
    """The params hold exactly B's adapters, and the forward is B's on a fresh base, bit for
    bit; A's entries used to stay (logits 0.90 to 1.37 off where A adapted what B does not)."""
    folder = bases(family, 3 if family == "qwen3" else 2)
    b_cfg = LoraConfig(rank=3, alpha=6.0, targets=b_targets)
    b = with_adapters(folder, b_cfg, seed=2)
    lora_mod.save_adapter(b.params, setup.adapter_layout(b), b_cfg, tmp_path / "b")
    fresh = moelab.load_pretrained(folder)
    loaded = lora_mod.load_adapter(fresh.params, setup.adapter_layout(fresh), tmp_path / "b")
    a_cfg = LoraConfig(rank=2, alpha=4.0, targets=a_targets, gate_up=a_gate_up)
    over = with_adapters(folder, a_cfg, seed=1)
    lora_mod.load_adapter(over.params, setup.adapter_layout(over), tmp_path / "b")
    ours, want = _adapters(over), _adapters(fresh)
    assert ours.keys() == want.keys()
    assert all(torch.equal(ours[path], t) for path, t in want.items())
    options = ForwardOptions(lora_scale=loaded.alpha / loaded.rank)
    assert torch.equal(over(IDS, options=options), fresh(IDS, options=options))


def test_an_adapter_that_does_not_fit_leaves_the_params_adapters_as_they_were(bases, tmp_path):
    folder = bases("qwen3", 3)
    cfg = LoraConfig(rank=2, targets=["experts", "attention"])
    model = with_adapters(folder, cfg)
    lora_mod.save_adapter(model.params, setup.adapter_layout(model), cfg, tmp_path / "b")
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    tensors["base_model.model.model.vision.lora_A.weight"] = torch.ones(2, 3)
    save_file(tensors, tmp_path / "b" / "adapter_model.safetensors")
    a = with_adapters(folder, LoraConfig(rank=1, targets=["mlp"]), seed=3)
    before = {path: t.clone() for path, t in _adapters(a).items()}
    with pytest.raises(moelab.CheckpointError, match="matches no module"):
        lora_mod.load_adapter(a.params, setup.adapter_layout(a), tmp_path / "b")
    after = _adapters(a)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[path], t) for path, t in before.items())


def test_a_router_an_earlier_adapter_trained_stays_with_a_warning(bases, tmp_path, caplog):
    """A router is a full weight, not an adapter: where B holds none, the one A changed cannot
    be told from the base's and stays (B's adapters replace A's all the same)."""
    folder = bases("gpt_oss", 2)
    b_cfg = LoraConfig(rank=2, targets=["attention"])
    b = with_adapters(folder, b_cfg, seed=2)
    lora_mod.save_adapter(b.params, setup.adapter_layout(b), b_cfg, tmp_path / "b")
    a = with_adapters(folder, LoraConfig(rank=2, targets=["experts", "router"]), seed=1)
    router = a.params["layers"][0]["mlp"]["router"]["weight"].clone()
    with caplog.at_level(logging.WARNING, logger="moelab"):
        lora_mod.load_adapter(a.params, setup.adapter_layout(a), tmp_path / "b")
    assert "holds no router" in caplog.text
    assert torch.equal(a.params["layers"][0]["mlp"]["router"]["weight"], router)
    assert _adapters(a).keys() == _adapters(b).keys()
