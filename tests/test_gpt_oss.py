"""GPT-OSS: Transformers-written and hand-made MXFP4 checkpoints, loaded by moelab."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_DEVICE, rel_err
from hf_fixtures import GPT_OSS_MAIN, gpt_oss_model, load_reference
from safetensors.torch import load_file, save_file

import moelab
from moelab.models import tree

pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))  # T > window 4
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss") / "bf16"
    gpt_oss_model().save_pretrained(path)
    return path


# ---- an MXFP4 checkpoint made by hand, with a quantiser and dequantiser of the test's own ----


def _ref_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """checkpoint-formats §4.3: exponent ceil(log2(amax / 6)), nearest code, low nibble first."""
    *lead, rows, cols = w.shape
    groups = w.double().reshape(-1, 32)
    blocks, scales = [], []
    for group in groups:
        amax = group.abs().max().item()
        exp = 0 if amax == 0 else int(torch.tensor(amax / 6).log2().ceil())
        codes = []
        for v in (group / 2.0**exp).tolist():
            code = min(range(8), key=lambda i: abs(abs(v) - FP4[i]))
            codes.append(code + (8 if v < 0 else 0))
        blocks.append([codes[2 * b] | (codes[2 * b + 1] << 4) for b in range(16)])
        scales.append(exp + 127)
    shape = (*lead, rows, cols // 32)
    return (
        torch.tensor(blocks, dtype=torch.uint8).reshape(*shape, 16),
        torch.tensor(scales, dtype=torch.uint8).reshape(shape),
    )


def _ref_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(FP4 + [-v for v in FP4], dtype=torch.float64)
    low, high = values[(blocks % 16).long()], values[(blocks // 16).long()]
    pairs = torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-1], 32)
    return (pairs * 2.0 ** (scales.double() - 127)[..., None]).reshape(*scales.shape[:-1], -1)


@pytest.fixture(scope="module")
def mxfp4_ckpt(tmp_path_factory, ckpt):
    path = tmp_path_factory.mktemp("gpt_oss") / "mxfp4"
    path.mkdir()
    tensors = load_file(ckpt / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _ref_quantize(t.transpose(1, 2))  # to the blocks orientation
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = t.to(torch.bfloat16)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("backend", ["native_torch", "grouped_mm"])
def test_fp32_logits_match_transformers(ckpt, attention, backend):
    ref = load_reference(ckpt)(IDS).logits
    model = moelab.load_pretrained(ckpt)
    assert model.config.layer_types[:2] == ("sliding_attention", "full_attention")
    out = model(IDS, options=moelab.ForwardOptions(attention=attention, backend=backend))
    assert rel_err(out, ref) <= 1e-5


def test_bf16_bit_exact_with_reference_numerics(ckpt):
    ref = load_reference(ckpt, torch.bfloat16)(IDS).logits
    model = moelab.load_pretrained(ckpt, dtype=torch.bfloat16)
    exact = moelab.ForwardOptions(backend="native_torch", attention="eager", accumulate="input")
    assert torch.equal(model(IDS, options=exact), ref)


BACKENDS = ("native_torch", "grouped_mm", "triton")


def test_every_backend_matches_in_fp32(ckpt):
    ref = load_reference(ckpt)(IDS).logits.to(TEST_DEVICE)
    model = moelab.load_pretrained(ckpt, device=TEST_DEVICE)
    ids = IDS.to(TEST_DEVICE)
    for backend in BACKENDS:
        assert rel_err(model(ids, options=moelab.ForwardOptions(backend=backend)), ref) <= 1e-5


def test_every_backend_runs_the_model_in_bf16(ckpt):
    """bf16 logits are chaotic in a tiny MoE: an ULP-level difference flips a near-tie top-k
    choice and moves that token (and later ones, through attention) by up to ~0.2. So: per-token
    errors against Transformers (median within bf16 tolerance) and, layer by layer on the same
    inputs, the backends' expert outputs against each other."""
    ref = load_reference(ckpt, torch.bfloat16)(IDS).logits.double().to(TEST_DEVICE)
    model = moelab.load_pretrained(ckpt, dtype=torch.bfloat16, device=TEST_DEVICE)
    ids = IDS.to(TEST_DEVICE)
    for backend in BACKENDS:
        out = model(ids, options=moelab.ForwardOptions(backend=backend, attention="eager"))
        per_token = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
        print(
            f"bf16 {backend}: per-token relative error median {per_token.median():.2e}, "
            f"max {per_token.max():.2e}"
        )
        assert per_token.median() <= 2e-2, backend

    import moelab.ops.moe as moe_module

    calls, original = [], moe_module.moe_experts

    def record(x, routing, gate_up, down, **kwargs):
        calls.append((x, routing, gate_up, down, kwargs))
        return original(x, routing, gate_up, down, **kwargs)

    moe_module.moe_experts = record
    try:
        model(ids, options=moelab.ForwardOptions(backend="native_torch"))
    finally:
        moe_module.moe_experts = original
    for x, routing, gate_up, down, kwargs in calls:
        kwargs.pop("backend")
        outs = [original(x, routing, gate_up, down, backend=b, **kwargs) for b in BACKENDS]
        for out in outs[1:]:
            assert rel_err(out, outs[0]) <= 1e-2


def test_mxfp4_checkpoint_dequantises_exactly(mxfp4_ckpt, ckpt):
    model = moelab.load_pretrained(mxfp4_ckpt, dtype=torch.float32)
    stored = load_file(mxfp4_ckpt / "model.safetensors")
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = _ref_dequantize(
            stored[prefix + "gate_up_proj_blocks"], stored[prefix + "gate_up_proj_scales"]
        )  # [E, 2I, H] interleaved
        canonical = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        experts = model.params["layers"][layer]["mlp"]["experts"]
        assert torch.equal(experts["gate_up"].double(), canonical)
        down = _ref_dequantize(
            stored[prefix + "down_proj_blocks"], stored[prefix + "down_proj_scales"]
        )
        assert torch.equal(experts["down"].double(), down)
    # and the whole model agrees with Transformers loading the same MXFP4 file
    hf = load_reference(mxfp4_ckpt, torch.float32)
    assert rel_err(model(IDS), hf(IDS).logits) <= 1e-5


@pytest.mark.parametrize("suffix, dtype", [("_scales", torch.float32), ("_blocks", torch.bfloat16)])
def test_mxfp4_blocks_and_scales_must_be_uint8(mxfp4_ckpt, tmp_path, suffix, dtype):
    tensors = load_file(mxfp4_ckpt / "model.safetensors")
    name = f"model.layers.1.mlp.experts.down_proj{suffix}"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((mxfp4_ckpt / "config.json").read_bytes())
    with pytest.raises(moelab.CheckpointError, match=f"1 wrong dtype: {name}: stored .*uint8"):
        moelab.load_pretrained(tmp_path)


def test_mxfp4_resave_gives_back_the_same_experts(mxfp4_ckpt, tmp_path):
    model = moelab.load_pretrained(mxfp4_ckpt, dtype=torch.float32)
    moelab.save_pretrained(model, tmp_path / "again", experts_format="mxfp4")
    again = moelab.load_pretrained(tmp_path / "again", dtype=torch.float32)
    for (path, a), (_, b) in zip(tree.leaves(model.params), tree.leaves(again.params)):
        if "experts" in path:
            assert torch.equal(a, b), tree.dotted(path)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]


def _theta_only(config: dict) -> None:
    del config["rope_parameters"]
    config["rope_theta"] = 20000.0


def _scaling_without_theta(config: dict) -> None:
    config["rope_scaling"] = config.pop("rope_parameters")
    del config["rope_scaling"]["rope_theta"]


def _parameters_without_theta(config: dict) -> None:
    del config["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("edit", [_theta_only, _scaling_without_theta, _parameters_without_theta])
def test_partial_rope_settings_take_transformers_defaults(ckpt, tmp_path, edit):
    """GPT-OSS's YaRN defaults and theta 150000 fill whatever rope keys a config leaves out."""
    for file in ckpt.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = moelab.load_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.rope.kind == "yarn"
    assert rel_err(model(IDS), load_reference(tmp_path)(IDS).logits) <= 1e-5


def test_bf16_save_loads_in_transformers(ckpt, tmp_path):
    model = moelab.load_pretrained(ckpt)
    moelab.save_pretrained(model, tmp_path / "saved")
    assert rel_err(load_reference(tmp_path / "saved")(IDS).logits, model(IDS)) <= 1e-6


def _merged_into_transformers(hf, adapters, scale: float) -> dict[str, torch.Tensor]:
    """Transformers' weights with each adapter merged in, ``W + scale * B A``: the formula that
    moelab's split LoRA avoids forming, so the two share none of their LoRA code."""
    base = dict(hf.named_parameters())
    merged = {}
    for layer, (a1, b1, a2, b2, q_a, q_b) in enumerate(adapters):
        prefix = f"model.layers.{layer}."
        # moelab's gate_up is [E, 2I, H], gate rows then up rows; Transformers' gate_up_proj is
        # [E, H, 2I] with gate and up columns interleaved; down [E, H, I] is its [E, I, H]
        d1 = scale * b1 @ a1
        inter = d1.shape[1] // 2
        d1 = torch.stack([d1[:, :inter], d1[:, inter:]], dim=2).reshape(d1.shape).transpose(1, 2)
        for name, delta in (
            ("mlp.experts.gate_up_proj", d1),
            ("mlp.experts.down_proj", (scale * b2 @ a2).transpose(1, 2)),
            ("self_attn.q_proj.weight", scale * q_b @ q_a),
        ):
            merged[prefix + name] = base[prefix + name] + delta
    return merged


def test_lora_training_step_gradients_match_float64(ckpt):
    """A LoRA training step's loss and adapter gradients (experts and attention, lora_scale 2)
    against Transformers in float64 with the adapters merged into its weights."""
    scale, experts, hidden, inter, rank = 2.0, 4, 64, 64, 8
    g = torch.Generator().manual_seed(0)

    def draw(*shape, std):
        return (torch.randn(*shape, generator=g) * std).requires_grad_(True)

    # per layer: experts' gate_up A, B and down A, B (ExpertLoRA's shapes), then q_proj's A, B;
    # B nonzero (not PEFT's init) so that every adapter moves the loss
    adapters = [
        (
            draw(experts, rank, hidden, std=hidden**-0.5),
            draw(experts, 2 * inter, rank, std=0.1),
            draw(experts, rank, inter, std=inter**-0.5),
            draw(experts, hidden, rank, std=0.1),
            draw(rank, hidden, std=0.1),
            draw(hidden, rank, std=0.1),
        )
        for _ in range(GPT_OSS_MAIN["num_hidden_layers"])
    ]
    leaves = [t for layer in adapters for t in layer]

    def next_token_loss(logits):  # in the logits' dtype: float64 for the reference
        return F.cross_entropy(logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))

    hf = load_reference(ckpt, torch.float64).requires_grad_(False)
    ref_adapters = [[t.detach().double().requires_grad_(True) for t in a] for a in adapters]
    merged = _merged_into_transformers(hf, ref_adapters, scale)
    ref_logits = torch.func.functional_call(hf, merged, (IDS,)).logits
    assert ref_logits.dtype == torch.float64
    ref_loss = next_token_loss(ref_logits)
    ref_grads = torch.autograd.grad(ref_loss, [t for layer in ref_adapters for t in layer])

    for backend in ("native_torch", "grouped_mm"):
        model = moelab.load_pretrained(ckpt, dtype=torch.float32)
        for layer, (a1, b1, a2, b2, q_a, q_b) in zip(model.params["layers"], adapters):
            layer["mlp"]["experts"]["lora"] = dict(gate_up_a=a1, gate_up_b=b1, down_a=a2, down_b=b2)
            layer["attn"]["q_proj"].update(lora_a=q_a, lora_b=q_b)
        logits = model(IDS, options=moelab.ForwardOptions(backend=backend, lora_scale=scale))
        loss = next_token_loss(logits)
        grads = torch.autograd.grad(loss, leaves)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item(), backend
        for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
            assert rel_err(grad, ref) <= 1e-4, (backend, i)
            assert ref.abs().sum() > 0, i  # every adapter reaches the loss


def _edit(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_scales_of_the_wrong_shape_are_refused(mxfp4_ckpt, tmp_path):
    import shutil

    bad = shutil.copytree(mxfp4_ckpt, tmp_path / "bad")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    _edit(bad, lambda t: t.__setitem__(name, t[name][:, :, :1].contiguous()))
    with pytest.raises(moelab.CheckpointError, match=f"{name}: stored \\[4, 64, 1\\], expected"):
        moelab.load_pretrained(bad)


def test_blocks_not_matching_the_config_are_refused(mxfp4_ckpt, tmp_path):
    import shutil

    bad = shutil.copytree(mxfp4_ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96  # the stored experts are 64 wide
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        moelab.CheckpointError, match="gate_up_proj_blocks: stored \\[4, 128, 2, 16\\]"
    ):
        moelab.load_pretrained(bad)


def test_unsupported_swiglu_constants_are_refused(ckpt, tmp_path):
    import shutil

    bad = shutil.copytree(ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["swiglu_limit"] = 5.0
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(moelab.CheckpointError, match="swiglu_limit=5.0"):
        moelab.load_pretrained(bad)
