"""The training app: config composition, short runs, resume, adapters, sweeps, bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import moelab
from moelab.models.options import ForwardOptions
from moelab.train import config as config_mod
from moelab.train import data as data_mod
from moelab.train import lora as lora_mod
from moelab.train import setup, state
from moelab.train.config import RunConfig
from moelab.train.trainer import train as run_training

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN = ROOT / "experiments" / "train.py"
REPORT = ROOT / "experiments" / "report.py"
sys.path.insert(0, str(ROOT / "experiments"))
import train  # noqa: E402, F401  (registers the structured-config schema with Hydra)

# on the CPU wherever the machine has a GPU: these tests compare fp32 runs bit for bit (a test
# that means the GPU says so with a later trainer.device=cuda, as test_trainer_graph does)
SMOKE = ["trainer=smoke", "logger=disabled", "data.max_bytes=400000", "trainer.device=cpu"]


def run_config(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    eval_loss = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    return train_loss, eval_loss


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(experiment):
    cfg = run_config([f"experiment={experiment}", "model.path=/ckpt", "data.path=/data.jsonl"])
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    "group", ["backend", "lora", "optim", "data", "trainer", "logger", "model"]
)
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = run_config([f"{group}={option}", "model.path=/ckpt", "data.path=/data.jsonl"])
        assert isinstance(cfg, RunConfig), (group, option)


def test_few_steps_in_process(tmp_path, caplog):
    with caplog.at_level("INFO", logger="moelab"):
        summary = run_training(run_config(SMOKE), tmp_path)
    train_loss, eval_loss = metrics(tmp_path)
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6] and sorted(eval_loss) == [0, 3, 6]
    assert eval_loss[6] < eval_loss[0]
    assert summary["backend"] == "grouped_mm" and summary["mode"] == "full"
    assert json.loads((tmp_path / "summary.json").read_text())["eval_loss"] == eval_loss[6]
    # the user sees what was chosen at the start and where the results went at the end
    assert "backend grouped_mm" in caplog.text
    assert "done, 6 steps" in caplog.text and f"eval loss {eval_loss[6]:.4f}" in caplog.text
    assert f"outputs in {tmp_path}" in caplog.text
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step_000006"
    # the full model in the hub layout loads back
    model = moelab.load_pretrained(tmp_path / "checkpoints" / "step_000006" / "model")
    assert model.config.vocab_size == 256


def test_logged_rates_are_the_steps_own(tmp_path, monkeypatch):
    """lr is the rate the step trained at; tokens are whole rows (767 tokens fit 5 rows of 128);
    evaluation and checkpoints take no time from the steps; the summary is tokens over time."""
    from moelab.train import trainer as trainer_mod

    offset = [0.0]  # evaluation and saving each take "100 s" on a clock the trainer reads
    real = trainer_mod.time.perf_counter
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: real() + offset[0])
    for module, name in ((trainer_mod, "evaluate"), (state, "save")):
        slow = getattr(module, name)

        def wrapped(*args, _slow=slow, **kwargs):
            offset[0] += 100.0
            return _slow(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    cfg = SMOKE + ["data.seq_len=128", "trainer.micro_batch_tokens=767", "trainer.grad_accum=2"]
    summary = run_training(run_config(cfg), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:  # warmup 20 steps from 3e-3: step n trains at 3e-3 * n / 20
        assert r["lr"] == pytest.approx(3e-3 * r["step"] / 20)
        assert r["tokens_per_s"] * r["step_ms"] / 1e3 == pytest.approx(5 * 128 * 2)
        assert r["step_ms"] < 50_000  # no evaluation or checkpoint inside
    total_s = sum(r["step_ms"] for r in steps) / 1e3
    assert summary["tokens_per_s"] == pytest.approx(6 * 5 * 128 * 2 / total_s)


@pytest.mark.parametrize("model", ["tiny", "tiny_gpt_oss"])
@pytest.mark.parametrize(
    "lora",
    [[], ["lora.rank=8"], ["lora.rank=8", "lora.gate_up=separate"]],
    ids=["full", "lora", "lora_separate_gate_up"],
)
def test_the_logged_backend_is_resolved_for_the_runs_blocks(monkeypatch, model, lora):
    """The run's log line names the backend its MoE blocks will pick: ``auto`` depends on rows
    per expert and the activation (BENCHMARKS.md), and a backend's support on the LoRA ranks,
    so the probe asks with the problem every block asks with: a micro-batch's tokens, the
    family's activation and biases, the adapters' ranks (separate gate and up adapters make
    gate_up's rank 2r). One token of SwiGLU named grouped_mm on a GPU where the blocks ran
    triton."""
    cfg = run_config([*SMOKE, f"model={model}", *lora])
    built = setup.build_model(cfg, torch.float32, torch.device("cpu"))
    if cfg.lora.rank is not None:
        lora_mod.add_lora(built.params, cfg.lora)
    asked = []
    resolve = setup.registry.resolve
    monkeypatch.setattr(setup.registry, "resolve", lambda b, p: asked.append(p) or resolve(b, p))
    ids = torch.randint(0, built.config.vocab_size, (2, 24))
    built(ids)  # every MoE block resolves its backend
    blocks = len(asked)
    name = setup.expert_backend(built, "auto", torch.float32, torch.device("cpu"), ids.numel())
    assert blocks >= 1 and len(asked) == blocks + 1
    assert all(p == asked[-1] for p in asked[:blocks])
    assert name == resolve(None, asked[-1]).NAME
    expected_ranks = {0: (0, 0), 1: (8, 8), 2: (8, 16)}[len(lora)]
    assert (asked[-1].lora_rank, asked[-1].lora_rank_max) == expected_ranks


@pytest.mark.parametrize(
    "mode",
    [[], ["lora.rank=8", "lora.dropout=0.1", "lora.targets=[experts,attention,router]"]],
    ids=["full", "lora_dropout_router"],
)
@pytest.mark.parametrize("flag", [["trainer.resume=true"], []], ids=["resume", "resume_from alone"])
def test_resume_continues_the_same_trajectory(tmp_path, mode, flag):
    whole = tmp_path / "whole"
    run_training(run_config(SMOKE + mode), whole)
    resumed = tmp_path / "resumed"
    ckpt = whole / "checkpoints" / "step_000003"
    run_training(run_config(SMOKE + mode + flag + [f"trainer.resume_from={ckpt}"]), resumed)
    expected, _ = metrics(whole)
    got, _ = metrics(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == expected[step], step


def test_resume_in_place_after_an_interruption(tmp_path, monkeypatch):
    first = run_training(
        run_config(SMOKE + ["trainer.steps=6", "trainer.checkpoint_interval=2"]), tmp_path / "ref"
    )
    run = tmp_path / "run"
    # a run that dies after its step-4 checkpoint, then `trainer.resume=true` in its folder
    original = state.save

    def dying_save(run_dir, step, *args, **kwargs):
        path = original(run_dir, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(state, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(run_config(SMOKE + ["trainer.checkpoint_interval=2"]), run)
    monkeypatch.setattr(state, "save", original)
    again = run_training(
        run_config(SMOKE + ["trainer.checkpoint_interval=2", "trainer.resume=true"]), run
    )
    assert again["final_loss"] == first["final_loss"]


@pytest.mark.parametrize(
    "variant",
    [
        ["lora.gate_up=fused"],
        ["lora.gate_up=separate"],
        ["lora.dropout=0.1"],  # PEFT refuses dropout on expert parameters: written as 0
        # a dense MLP layer's adapters: moelab reads them back; PEFT 0.21 takes their names
        # for the experts' and cannot (the run says so)
        ["+model.arch.mlp_only_layers=[0]", "lora.targets=[experts,attention,mlp,router]"],
    ],
    ids=["fused", "separate", "dropout", "dense_mlp"],
)
def test_lora_adapters_round_trip_merge_and_load_in_peft(tmp_path, variant, caplog):
    run = tmp_path / "run"
    overrides = SMOKE + ["lora.rank=8", "lora.targets=[experts,attention,router]", *variant]
    with caplog.at_level("WARNING", logger="moelab"):
        run_training(run_config(overrides), run)
    dense_mlp = "mlp" in run_config(overrides).lora.targets
    assert ("PEFT (0.21) takes gate_proj" in caplog.text) == dense_mlp
    ckpt = state.find(run)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))

    # the trained tensors, exactly as they were (kept for resume) ...
    trained = moelab.load_pretrained(run / "base_model")
    lora_cfg = run_config(overrides).lora
    lora_mod.add_lora(trained.params, lora_cfg)
    state.restore_params(ckpt, trained, state.load_trainer_state(ckpt))
    options = ForwardOptions(lora_scale=lora_cfg.alpha / lora_cfg.rank)
    expected = trained(ids, options=options)
    # ... equal the exported PEFT adapter reloaded into a fresh base
    fresh = moelab.load_pretrained(run / "base_model")
    loaded = lora_mod.load_adapter(fresh.params, setup.adapter_layout(fresh), ckpt / "adapter")
    scale = loaded.alpha / loaded.rank
    assert scale == lora_cfg.alpha / lora_cfg.rank
    assert rel_err(fresh(ids, options=ForwardOptions(lora_scale=scale)), expected) <= 1e-6
    base_logits = moelab.load_pretrained(run / "base_model")(ids)
    assert rel_err(base_logits, expected) > 1e-3  # the adapters (and router) changed the model
    merged = moelab.Model(fresh.family, fresh.config, lora_mod.merged(fresh.params, scale))
    assert rel_err(merged(ids), expected) <= 1e-5

    if dense_mlp:
        return
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        run / "base_model", attn_implementation="eager", experts_implementation="eager"
    )
    with_adapter = peft.PeftModel.from_pretrained(hf, ckpt / "adapter")
    assert rel_err(with_adapter(ids).logits, expected) <= 1e-5


def test_gpt_oss_lora_adapters_load_in_peft(tmp_path):
    """GPT-OSS stores gate and up interleaved: the exported adapter must follow."""
    overrides = SMOKE + [
        "model=tiny_gpt_oss",
        "lora.rank=8",
        "lora.targets=[experts,attention,router]",
    ]
    run = tmp_path / "run"
    run_training(run_config(overrides), run)
    ckpt = state.find(run)
    model = moelab.load_pretrained(run / "base_model")
    lora_cfg = run_config(overrides).lora
    lora_mod.add_lora(model.params, lora_cfg)
    state.restore_params(ckpt, model, state.load_trainer_state(ckpt))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = model(ids, options=ForwardOptions(lora_scale=lora_cfg.alpha / lora_cfg.rank))
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        run / "base_model", attn_implementation="eager", experts_implementation="eager"
    )
    assert (
        rel_err(peft.PeftModel.from_pretrained(hf, ckpt / "adapter")(ids).logits, expected) <= 1e-5
    )


def test_activation_checkpointing_changes_nothing(tmp_path):
    a = run_training(run_config(SMOKE), tmp_path / "a")
    b = run_training(run_config(SMOKE + ["trainer.activation_checkpointing=true"]), tmp_path / "b")
    assert metrics(tmp_path / "a")[0] == metrics(tmp_path / "b")[0]
    assert a["eval_loss"] == b["eval_loss"]


def test_bf16_keeps_fp32_masters(tmp_path):
    summary = run_training(
        run_config(SMOKE + ["trainer.precision=bf16", "trainer.steps=3"]), tmp_path
    )
    assert summary["dtype"] == "bfloat16"
    saved = state.load_trainer_state(state.find(tmp_path))
    assert saved["masters"] and all(m.dtype == torch.float32 for m in saved["masters"])


def test_fine_tune_a_checkpoint_on_jsonl_with_its_tokenizer(tmp_path):
    from hf_fixtures import save_qwen3
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    ckpt = save_qwen3(tmp_path / "ckpt")
    texts = [
        f"document {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(80)
    ]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=100, special_tokens=["[UNK]"])
    )
    tok.save(str(ckpt / "tokenizer.json"))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    cfg = run_config(
        SMOKE
        + [
            "model=qwen3_moe",
            f"model.path={ckpt}",
            "data=files",
            f"data.path={data}",
            "data.seq_len=16",
            "trainer.micro_batch_tokens=64",
            "lora=experts_attention",
            "lora.rank=8",
        ]
    )
    summary = run_training(cfg, tmp_path / "run")
    assert summary["mode"].startswith("LoRA r=8")
    assert (state.find(tmp_path / "run") / "adapter" / "adapter_config.json").exists()


def test_one_text_file_is_split_into_train_and_held_out_text(tmp_path):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(600)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    summary = run_training(
        run_config(
            SMOKE
            + ["data=files", f"data.path={corpus}", "data.tokenizer=byte", "data.seq_len=64"]
            + ["data.eval_fraction=0.1"]
        ),
        tmp_path / "run",
    )
    assert summary["steps"] == 6
    head, tail = data_mod.split_documents(data_mod.file_documents(corpus), 0.1)
    assert head[0][1] + tail[0][1] == corpus.read_text()  # nothing lost, nothing shared
    assert tail[0][1].startswith("line ") and len(tail[0][1]) < len(head[0][1]) / 5


def test_a_lone_document_is_cut_near_its_split_point(tmp_path):
    text = "Title\n" + "word " * 20000  # its only newline is far before the split point
    head, tail = data_mod.split_documents([("doc", text)], 0.05)
    assert head[0][1] + tail[0][1] == text and len(tail[0][1]) == len(text) - int(len(text) * 0.95)


def test_a_source_without_text_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no documents"):
        data_mod.split_documents(data_mod.file_documents(tmp_path / "empty"), 0.1)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_two_job_multirun_and_report(tmp_path):
    pytest.importorskip("wandb")  # a declared dependency; the GPU machine's image lacks it
    sweep = tmp_path / "sweep"
    out = _cli(
        [
            "-m",
            "backend=native_torch,grouped_mm",
            "trainer=smoke",
            "logger=offline",
            "data.max_bytes=400000",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["backend"] == ("native_torch" if job == "0" else "grouped_mm")
        assert list((sweep / job / "wandb").glob("offline-run-*")), "no wandb offline run"
        logger = json.loads((sweep / job / "run_config.json").read_text())["logger"]
        assert logger["group"] == "sweep" and logger["job_type"] == summary["backend"]
        assert f"backend_{summary['backend']}" in logger["tags"] and "full" in logger["tags"]
    report = subprocess.run(
        [sys.executable, str(REPORT), str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    table = (sweep / "report.md").read_text()
    assert "native_torch" in table and "grouped_mm" in table
    assert (sweep / "loss.png").stat().st_size > 0 and (sweep / "throughput.png").stat().st_size > 0


def test_the_readme_resume_keeps_the_runs_config(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    first = ["trainer=smoke", "backend=native_torch", "logger=offline", "data.max_bytes=400000"]
    first += ["trainer.device=cpu", "optim.lr=2e-3"]
    out = _cli([*first, f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    # the README's command, plus a longer run: the recorded config, not the defaults, goes on
    out = _cli(["trainer.resume=true", "trainer.steps=9", f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = json.loads((run / "run_config.resume_000006.json").read_text())
    assert resumed["backend"]["name"] == "native_torch" and resumed["optim"]["lr"] == 2e-3
    assert resumed["trainer"]["micro_batch_tokens"] == 512 and resumed["trainer"]["steps"] == 9
    assert json.loads((run / "summary.json").read_text())["backend"] == "native_torch"
    train_loss, _ = metrics(run)
    assert sorted(train_loss) == list(range(1, 10))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one wandb id
    assert json.loads((run / "overrides.json").read_text()) == first  # for report.py
    assert (run / "run_config.latest").read_text() == "run_config.resume_000006.json\n"
    # a later resume goes on from the config the run last ran with (9 steps), and the groups
    # it was started with may be repeated (a sweep resumed job by job); others cannot change
    again = ["trainer.resume=true", "backend=native_torch", f"hydra.run.dir={run}"]
    out = _cli(again, tmp_path)
    assert out.returncode == 0 and "nothing to train (trainer.steps=9)" in out.stdout + out.stderr
    assert (run / "run_config.latest").read_text() == "run_config.resume_000006.json\n"
    out = _cli(["trainer.resume=true", "backend=grouped_mm", f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode != 0 and "not config groups" in out.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend=cuda_magic"], "Could not find 'backend/cuda_magic'"),
        (["backend.name=cuda_magic"], "backend.name='cuda_magic' is not valid"),
        (["lora.rank=0"], "lora.rank=0 is not valid"),
        (["lora.rank=4", "lora.targets=[experts,everything]"], "lora.targets"),
        (["data=files"], "data.source=files needs data.path"),
        (["data=files", "data.path=/no/such/file.jsonl"], "does not exist"),
        (["model.nonexistent=1"], "nonexistent"),
        (["model=qwen3_moe", "model.path=/no/such/ckpt"], "is not a folder"),
        (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid"),
        (["backend=grouped_mm", "trainer.moe_recompute=true"], "recompute is triton's"),
        (["trainer.cuda_graph=true", "trainer.device=cpu"], "trainer.cuda_graph=true replays"),
        (["trainer.device=gpu0"], "trainer.device='gpu0' is not valid"),
    ],
)
def test_bad_values_stop_before_any_work(tmp_path, overrides, message):
    out = _cli([*overrides, f"hydra.run.dir={tmp_path / 'run'}", "logger=disabled"], tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rank=4", "lora.alpha=0"], "lora.alpha=0.0 is not valid: expected > 0"),
        (["trainer.device=cuda:99"], "trainer.device='cuda:99' is not valid: expected"),
    ],
)
def test_values_validate_refuses(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_mod.validate(run_config(overrides))


@pytest.mark.parametrize(
    "targets, message",
    [("[router]", "router alone has no adapter"), ("[experts,shared]", r"\['shared'\] has no")],
)
def test_lora_targets_the_model_lacks_stop_before_anything_is_written(tmp_path, targets, message):
    cfg = run_config(SMOKE + ["lora.rank=4", f"lora.targets={targets}"])
    with pytest.raises(ValueError, match=message):
        run_training(cfg, tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_wandb_logger_without_wandb_stops_before_any_work(monkeypatch):
    find_spec = config_mod.importlib.util.find_spec
    monkeypatch.setattr(
        config_mod.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "wandb" else find_spec(name, *args),
    )
    config_mod.validate(run_config(["logger=disabled"]))
    for mode in ("offline", "online"):
        with pytest.raises(ValueError, match=f"logger.mode='{mode}' logs to wandb, which is not"):
            config_mod.validate(run_config([f"logger={mode}"]))
