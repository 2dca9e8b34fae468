"""What moelab writes, read back by moelab and by Transformers / PEFT, and what a failed or
refused write leaves: MXFP4 values the format cannot hold as they are, adapters saved over a
file or a folder, a rename that fails, saves beside other files."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import rel_err
from hf_fixtures import gpt_oss_model, load_reference, qwen3_model, save_random_mxfp4
from safetensors.torch import save_file

import moelab
from moelab.bench.train_step import hf_config
from moelab.checkpoints import api, mxfp4
from moelab.checkpoints import safetensors_io as sio
from moelab.files import UMASK
from moelab.models import tree
from moelab.models.model import Model
from moelab.models.options import ForwardOptions
from moelab.ops.lora import is_adapter
from moelab.train import lora as lora_mod
from moelab.train import setup
from moelab.train.config import LoraConfig

pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(11))
EXACT = ForwardOptions(backend="native_torch", attention="eager", accumulate="input")
FMAX = torch.finfo(torch.float32).max
INF = math.inf


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _tiny(name: str) -> Model:
    hf = hf_config(name, 2)
    family, _ = api.FAMILIES[hf["model_type"]]
    cfg = family.Config.from_hf(hf)
    return Model(family, cfg, family.init_params(cfg, generator=torch.Generator().manual_seed(0)))


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _with_adapters(model: Model, cfg: LoraConfig) -> Model:
    lora_mod.add_lora(model.params, cfg, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for path, t in tree.leaves(model.params):
        if is_adapter(path) or (path[-3:-1] == ("mlp", "router") and "router" in cfg.targets):
            t.data.add_(0.3 * torch.randn(t.shape, generator=g).to(t.dtype))
    return model


# ---- save_pretrained -> Transformers ----


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_sharded_tied_saves_load_in_transformers_bit_exact_in_bf16(tmp_path, family):
    """Tied embeddings, Qwen3's sparse step, GPT-OSS's biases and sinks, in shards."""
    if family == "qwen3":
        hf = qwen3_model(tie_word_embeddings=True, decoder_sparse_step=2, mlp_only_layers=[])
    else:
        hf = gpt_oss_model(tie_word_embeddings=True, num_hidden_layers=2)
    hf.save_pretrained(tmp_path / "hf")
    for dtype in (torch.float32, torch.bfloat16):
        model = moelab.load_pretrained(tmp_path / "hf", dtype=dtype)
        out = tmp_path / str(dtype)
        moelab.save_pretrained(model, out, max_shard_bytes=40_000)
        assert len(json.loads((out / sio.INDEX_FILE).read_text())["weight_map"]) > 10
        ref = load_reference(out, dtype)
        assert {p.dtype for p in ref.parameters()} == {dtype}
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
        if dtype == torch.float32:
            assert rel_err(model(IDS), ref(IDS).logits) <= 1e-6
        else:
            assert torch.equal(model(IDS, options=EXACT), ref(IDS).logits)


# ---- MXFP4 ----


# input values of one group of 32 (the rest zeros) -> the values dequantize gives back
MXFP4_VALUES = {
    "±inf come back infinite, keeping their sign": ([INF, -INF, 2.0**127], [INF, -INF, 2.0**127]),
    "finite past 6·2^126 saturate to the largest finite, 1.5·2^127": (
        [3e38, -FMAX, 1.0],
        [1.5 * 2.0**127, -1.5 * 2.0**127, 0.0],
    ),
    "-0 stays -0; a negative rounding to zero gives -0": (
        [-0.0, 0.0, 1.0, -0.01],
        [-0.0, 0.0, 1.0, -0.0],
    ),
    "all zeros": ([0.0, -0.0], [0.0, -0.0]),
    "below the smallest exponent 2^-127: nearest multiple of 2^-128": (
        [6 * 2.0**-127, 0.7 * 2.0**-128, -(2.0**-130)],
        [6 * 2.0**-127, 2.0**-128, -0.0],
    ),
    "ties go to the smaller magnitude": ([6.0, 5.0, 0.75, -0.25], [6.0, 4.0, 0.5, -0.0]),
}


@pytest.mark.parametrize("case", list(MXFP4_VALUES))
def test_mxfp4_encodes_values_it_cannot_hold_as_documented(case):
    given, expected = MXFP4_VALUES[case]
    w = torch.zeros(1, 32)
    w[0, : len(given)] = torch.tensor(given, dtype=torch.float64).float()
    blocks, scales = mxfp4.quantize(w)
    got = mxfp4.dequantize(blocks, scales, torch.float32)[0, : len(expected)]
    want = torch.tensor(expected, dtype=torch.float64).float()
    assert torch.equal(_bits(got), _bits(want)), got.tolist()


def test_mxfp4_quantises_a_few_rows_at_a_time_to_the_same_bits(monkeypatch):
    """The nearest-code search holds about 74 bytes of temporaries per weight (measured by peak
    RSS at 66M weights: 4.7 GB); whole expert stacks at once needed tens of GB per GPT-OSS layer.
    Rows go through it a chunk at a time, with the same bits as all at once."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 7, 96, generator=g) * torch.logspace(-3, 3, 96)
    w[0, 5, 3], w[1, 6, 0], w[2, 1, 40] = math.inf, -0.0, 3e38
    whole = mxfp4.quantize(w.bfloat16())
    seen = []
    quantize_rows = mxfp4._quantize_rows
    monkeypatch.setattr(mxfp4, "_CHUNK_ROWS", 4)
    monkeypatch.setattr(mxfp4, "_quantize_rows", lambda r: seen.append(len(r)) or quantize_rows(r))
    chunked = mxfp4.quantize(w.bfloat16())
    assert seen == [4, 4, 4, 4, 4, 1]  # 21 rows
    for got, want in zip(chunked, whole):
        assert got.shape == want.shape and torch.equal(got, want)
    empty = mxfp4.quantize(torch.zeros(2, 0, 64))
    assert [tuple(t.shape) for t in empty] == [(2, 0, 2, 16), (2, 0, 2)]


def test_mxfp4_nan_is_refused_by_name_and_the_folder_kept(tmp_path):
    model = _tiny("tiny-gpt-oss")
    folder = tmp_path / "ckpt"
    moelab.save_pretrained(model, folder, experts_format="mxfp4")
    before = _snapshot(folder)
    model.params["layers"][1]["mlp"]["experts"]["down"][2, 3, 4] = math.nan
    name = "model.layers.1.mlp.experts.down_proj_blocks"
    with pytest.raises(ValueError, match=f"{name}: MXFP4 cannot store NaN \\(1 NaN values\\)"):
        moelab.save_pretrained(model, folder, experts_format="mxfp4")
    assert _snapshot(folder) == before
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.fixture(scope="module")
def odd_bytes(tmp_path_factory):
    """MXFP4 experts of random bytes: every code, exponents 0 (subnormal) to 255 (overflow)."""

    def edit(blocks, scales):
        scales[0, 0, :2] = torch.tensor([0, 255])
        scales[0, 1, :2] = torch.tensor([253, 254])  # 4·2^126 and 2·2^127 overflow float32
        blocks[0, 2, 0] = 0x88  # -0, -0

    return save_random_mxfp4(tmp_path_factory.mktemp("odd_bytes"), edit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_load_save_load_is_bit_exact_for_any_stored_bytes(odd_bytes, tmp_path, dtype):
    """Loaded -> saved as MXFP4 -> loaded gives the first load back bit for bit (±inf and -0
    included; they came back as 0 and +0), and Transformers dequantises the save to the same."""
    first = moelab.load_pretrained(odd_bytes, dtype=dtype)
    moelab.save_pretrained(first, tmp_path / "again", experts_format="mxfp4")
    again = moelab.load_pretrained(tmp_path / "again", dtype=dtype)
    hf = load_reference(tmp_path / "again", dtype)
    for layer in range(2):
        ours = first.params["layers"][layer]["mlp"]["experts"]
        back = again.params["layers"][layer]["mlp"]["experts"]
        for key in ("gate_up", "down", "gate_up_bias", "down_bias"):
            assert torch.equal(_bits(back[key]), _bits(ours[key])), (layer, key)
        ref = hf.model.layers[layer].mlp.experts
        gate_up = ref.gate_up_proj.detach().transpose(1, 2)
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        assert torch.equal(_bits(back["gate_up"]), _bits(gate_up)), layer
        assert torch.equal(_bits(back["down"]), _bits(ref.down_proj.detach().transpose(1, 2)))
    values = first.params["layers"][0]["mlp"]["experts"]["down"].float()
    assert values.isinf().any() and (values == 0).logical_and(values.signbit()).any()


# ---- adapters ----


def test_adapter_config_and_logits_as_peft_reads_them(tmp_path):
    """Tied Qwen3 with a sparse step, separate gate/up, a trained router and dropout."""
    peft = pytest.importorskip("peft")
    qwen3_model(
        tie_word_embeddings=True, decoder_sparse_step=2, mlp_only_layers=[]
    ).save_pretrained(tmp_path / "base")
    cfg = LoraConfig(
        rank=3,
        alpha=5.0,
        dropout=0.1,
        targets=["experts", "attention", "router"],
        gate_up="separate",
    )
    model = _with_adapters(moelab.load_pretrained(tmp_path / "base"), cfg)
    lora_mod.save_adapter(model.params, setup.adapter_layout(model), cfg, tmp_path / "adapter")
    read = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert (read.r, read.lora_alpha, read.lora_dropout, read.bias) == (6, 10.0, 0.0, "none")
    assert sorted(read.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert list(read.target_parameters) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert read.modules_to_save == ["gate"]
    with_adapter = peft.PeftModel.from_pretrained(
        load_reference(tmp_path / "base"), tmp_path / "adapter"
    )
    with torch.no_grad():
        ref = with_adapter(IDS).logits
    assert rel_err(model(IDS, options=ForwardOptions(lora_scale=cfg.alpha / cfg.rank)), ref) <= 1e-5


ADAPTER_CFG = LoraConfig(rank=2, targets=["experts", "attention"])


def _save_adapter(model: Model, path) -> None:
    lora_mod.save_adapter(model.params, setup.adapter_layout(model), ADAPTER_CFG, path)


def test_an_adapter_saved_over_a_file_is_refused(tmp_path):
    model = _with_adapters(_tiny("tiny-qwen3"), ADAPTER_CFG)
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a folder"
    assert os.listdir(tmp_path) == ["adapter"]


def test_an_adapter_saved_over_a_folder_keeps_its_other_files_and_is_readable(tmp_path):
    model = _with_adapters(_tiny("tiny-gpt-oss"), ADAPTER_CFG)
    folder = tmp_path / "adapter"
    _save_adapter(model, folder)
    (folder / "README.md").write_text("notes")
    (folder / "logs").mkdir()
    (folder / "logs" / "run.txt").write_text("kept")
    _save_adapter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "logs",
    ]
    assert (folder / "logs" / "run.txt").read_text() == "kept"
    assert folder.stat().st_mode & 0o777 == 0o777 & ~UMASK  # save_pretrained's modes
    assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~UMASK


# ---- failure safety ----


def test_save_pretrained_keeps_other_safetensors_files_and_drops_stale_shards(tmp_path):
    """Only the model's weights are replaced, as in Transformers: a PEFT adapter kept beside the
    model survives a save (moelab deleted every *.safetensors)."""
    model = _tiny("tiny-qwen3")
    folder = tmp_path / "ckpt"
    moelab.save_pretrained(model, folder, max_shard_bytes=2**16)
    _save_adapter(_with_adapters(_tiny("tiny-qwen3"), ADAPTER_CFG), tmp_path / "adapter")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).write_bytes((tmp_path / "adapter" / name).read_bytes())
    moelab.save_pretrained(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize("writer", ["save_pretrained", "save_adapter"])
def test_a_failed_move_of_the_old_folder_leaves_it_and_no_temporary_folder(
    tmp_path, monkeypatch, writer
):
    model = _tiny("tiny-gpt-oss")
    if writer == "save_adapter":
        _with_adapters(model, ADAPTER_CFG)
    save = _save_adapter if writer == "save_adapter" else moelab.save_pretrained
    save(model, tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    rename = os.replace

    def refused(src, dst):  # e.g. EACCES on a folder without write permission
        if ".out.old-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        save(model, tmp_path / "out")
    assert _snapshot(tmp_path / "out") == before
    assert os.listdir(tmp_path) == ["out"]


def test_a_writer_failing_after_the_first_shard_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = _tiny("tiny-qwen3")
    folder = tmp_path / "ckpt"
    moelab.save_pretrained(model, folder, max_shard_bytes=2**16)
    (folder / "tokenizer.json").write_text("{}")
    before = _snapshot(folder)
    written = []

    def second_fails(tensors, filename, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(filename)
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(sio, "save_file", second_fails)
    for _, t in tree.leaves(model.params):
        t.data.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        moelab.save_pretrained(model, folder, max_shard_bytes=2**16)
    assert written and _snapshot(folder) == before
    assert os.listdir(tmp_path) == ["ckpt"]
