"""The memory plan: against measured CPU peaks of the embedded model, and hand-computed 8B figures."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

import torch  # noqa: E402

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm import data as data_mod  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.model import DiffusionLM, load_model_dir  # noqa: E402
from mdlm_ctc.mdlm.objectives import (collate, compute_loss, denominators, layout_length,  # noqa: E402
                                      resolve_fused_lm_head)
from mdlm_ctc.mdlm.plan import GIB, lora_params, model_shape, plan_job  # noqa: E402
from mdlm_ctc.mdlm.train import make_optimizer, prepare  # noqa: E402

# LLaDA-8B-Instruct's config.json (the fields the plan reads), as published with the model
LLADA_8B = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_heads": 32,
            "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464,
            "embedding_size": 126464, "weight_tying": False, "max_sequence_length": 4096,
            "mask_token_id": 126336, "eos_token_id": 126081}
LLADA_LINEARS = "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out"


def _measured_peak(cfg) -> int:
    """Peak bytes of one training step (forward, backward, AdamW step) tracked by torch's MemTracker."""
    MemTracker = pytest.importorskip("torch.distributed._tools.mem_tracker").MemTracker  # noqa: N806

    prepared = prepare(cfg, cfg.run_dir(), log=lambda *a: None)
    hf, _, special = load_model_dir(prepared.init_source, cfg, torch.device("cpu"))
    if cfg.model.gradient_checkpointing:
        hf.gradient_checkpointing_enable()
    net = DiffusionLM(hf).train()
    head = resolve_fused_lm_head(cfg.model.fused_lm_head, hf)
    optimizer, _ = make_optimizer(net, cfg)
    rows = prepared.train_rows
    order = data_mod.GlobalOrder(len(rows), cfg.train.batch_size, cfg.run.seed)

    def step(index):
        batch_rows = [rows[i] for i in order.batch(index)]
        length = layout_length(batch_rows, cfg.data)
        batch = collate(batch_rows, length, special.eos_id,
                        [data_mod.noise_seed(cfg.run.seed, index, j) for j in range(len(batch_rows))])
        loss, _ = compute_loss(net, batch, objective=cfg.objective.objective, special=special, obj_cfg=cfg.objective,
                               denoms=denominators(batch_rows, length), head=head, align_model=net)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # AdamW's state exists from the second step on
    tracker = MemTracker()
    tracker.track_external(net, optimizer)
    with tracker:
        step(1)
    (device_peak,) = tracker.get_tracker_snapshot("peak").values()
    return device_peak["Total"]


@pytest.mark.parametrize("options", [
    {},                                                         # activation-bound
    {"gradient_checkpointing": True},
    {"attn_implementation": "eager", "objective": "ce"},
    {"tiny_layers": 2, "tiny_hidden_size": 512, "tiny_intermediate_size": 2048, "batch_size": 8},  # optimizer-bound
], ids=["default", "checkpointing", "eager-ce", "wide"])
def test_plan_is_within_25_percent_of_the_measured_cpu_peak(tmp_path, options):
    cfg = Config.from_dict({"output_dir": str(tmp_path), "device": "cpu", "synthetic_train_size": 300,
                            "synthetic_eval_size": 10, "progress": False, **options})
    measured = _measured_peak(cfg)
    planned = plan_job(cfg, world=1, gpu=False).estimates["ddp"].total
    assert 0.75 * measured <= planned <= 1.25 * measured, (planned / 2 ** 20, measured / 2 ** 20)


@pytest.mark.parametrize("targets", ["q_proj,v_proj,down_proj", "all-linear",
                                     "self_attn.o_proj,model.layers.1.mlp.up_proj"])
def test_lora_trainable_count_matches_peft(tmp_path, targets):
    """The plan's count (from the config alone) is peft's own count of what it trains."""
    from mdlm_ctc.mdlm.lora import apply_lora, linear_layers

    cfg = Config.from_dict({"output_dir": str(tmp_path), "device": "cpu", "synthetic_train_size": 300,
                            "synthetic_eval_size": 10, "lora": True, "lora_rank": 8, "lora_target_modules": targets})
    prepared = prepare(cfg, cfg.run_dir(), log=lambda *a: None)
    hf, _, special = load_model_dir(prepared.init_source, cfg, torch.device("cpu"))
    shape = model_shape(cfg)
    assert shape.linear_layers() == linear_layers(hf)  # the plan's module table is the model's
    peft_model = apply_lora(hf, cfg, special.slack_id)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert shape.params == sum(p.numel() for n, p in hf.named_parameters() if "lora_" not in n
                               and "trainable_tokens" not in n)
    assert lora_params(shape, 8, targets) == trainable


@pytest.fixture
def llada_dir(tmp_path):
    folder = tmp_path / "llada"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLADA_8B))
    return folder


def _llada_cfg(folder, **options):
    return Config.from_dict({"model": str(folder), "device": "cuda", "max_length": 1024, "batch_size": 64,
                             "micro_batch_size": 4, "gpu_memory_gb": 80, "lora_target_modules": LLADA_LINEARS,
                             **options})


def test_8b_figures_match_hand_computation(llada_dir):
    plan = plan_job(_llada_cfg(llada_dir), world=8, gpu=True)
    shape = plan.job.shape
    # per layer: q, k, v, out 4 * 4096^2; ff_proj, up_proj, ff_out 3 * 4096 * 12288; two norms 2 * 4096
    assert shape.layer_params == 67_108_864 + 150_994_944 + 8_192 == 218_112_000
    # embeddings and untied head 2 * 126464 * 4096, final norm 4096
    assert shape.params == 32 * 218_112_000 + 1_035_993_088 + 4_096 == 8_015_581_184
    ddp, fsdp = plan.estimates["ddp"], plan.estimates["fsdp"]
    # DDP: fp32 weights + bf16 autocast copy (6 B), fp32 gradients (4 B), AdamW moments (8 B) per parameter
    assert ddp.weights + ddp.gradients + ddp.optimizer == 18 * 8_015_581_184
    assert (ddp.weights + ddp.gradients + ddp.optimizer) / GIB == pytest.approx(134.37, abs=0.01)
    # FSDP over 8: 16 B / 8 per parameter, plus the unsharded bf16 root group + 2 layers (weights) and the
    # root group + 1 layer (gradients before the reduce-scatter)
    static = 2 * 8_015_581_184 + 2 * (1_035_997_184 + 2 * 218_112_000) + 2 * (1_035_997_184 + 218_112_000)
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == static
    # activations: 4 x 1024 tokens x 32 layers x (8 h + 3 h + 4 I) x 2 B; checkpointed: layer inputs + 1 layer
    assert fsdp.activations_full == 4096 * 32 * (11 * 4096 + 4 * 12288) * 2 == 24_696_061_952
    assert fsdp.activations_checkpointed == 4096 * 32 * 4096 * 2 + 4096 * (11 * 4096 + 4 * 12288) * 2
    # fused head: a 1024-frame chunk of logits and its gradient in bf16 + the fp32 [tokens, h] accumulator
    assert fsdp.head == 2 * 1024 * 126464 * 2 + 4 * 4096 * 4096
    lora = plan_job(_llada_cfg(llada_dir, lora=True), world=1, gpu=True).estimates["lora"]
    # r = 32 on 4 (h x h) + 3 (h x I) per layer, plus two slack rows of 4096
    trainable = 32 * (32 * (4 * 2 * 4096 + 3 * (4096 + 12288))) + 2 * 4096
    assert lora.optimizer == 8 * trainable and lora.gradients == 4 * trainable
    assert lora.weights == 2 * 8_015_581_184 + 6 * trainable


def test_a_job_that_cannot_fit_is_refused_naming_what_would(llada_dir, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {llada_dir}\ndevice: cuda\nmax_length: 1024\nbatch_size: 64\nmicro_batch_size: 4\n"
                   f"world_size: 8\ngpu_memory_gb: 80\n")
    assert main(["plan", "--config", str(job)]) == 3
    out = capsys.readouterr().out
    assert "ddp: 157.92 GiB of 72.0 usable (80 GiB GPU, 90%): DOES NOT FIT" in out
    assert "--distributed fsdp would fit (43.6 GiB per GPU)" in out
    assert main(["plan", "--config", str(job), "--distributed", "fsdp", "--gradient-checkpointing"]) == 0
    assert "fsdp: 22.27 GiB of 72.0 usable" in capsys.readouterr().out
    plan = plan_job(_llada_cfg(llada_dir, micro_batch_size=16, world_size=1, lora=True), gpu=True)
    assert plan.fits is False and plan.suggestion.startswith("--gradient-checkpointing would fit")
    assert "--gradient-checkpointing would fit" in plan.refusal() and "80 GiB GPU" in plan.refusal()


def test_train_prints_the_plan_first(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "--device", "cpu", "--steps", "1", "--batch-size", "2",
                 "--synthetic-train-size", "50", "--synthetic-eval-size", "5", "--tiny-hidden-size", "32",
                 "--tiny-layers", "1", "--tiny-intermediate-size", "64", "--no-progress",
                 "--checkpoint-every", "0"]) == 0
    out = capsys.readouterr().out
    assert out.index("memory plan per process") < out.index("trained ctc")
