"""The training loop: preparation, accumulation, clipping, schedules, checkpoints, resume, DDP/FSDP2, LoRA.

**Determinism.** A step's rows, their layout and their masking noise depend only on (seed, step)
(``data.GlobalOrder``, ``data.noise_seed``), and the model, optimizer and scheduler state are
restored exactly, so a run killed at any point and resumed from its last checkpoint ends with the
same weights and metrics as an uninterrupted one (bitwise on CPU).

**DDP** (``torchrun --nproc_per_node=N -m mdlm_ctc train ...``): gloo on CPU, NCCL on GPU. The global
batch is split into ``N * accumulation`` micro-batches; every micro-batch loss is already normalised by
the *global* batch's denominators and multiplied by ``N`` (DDP averages gradients), so the update is the
one a single process computes with the same global batch, up to float summation order.

**FSDP2** (``--distributed fsdp``): see ``distributed``; the same loss scaling holds (FSDP2 averages
gradients like DDP). **LoRA** (``--lora``): see ``lora``; only the adapters and the slack row train.

**Checkpoints** (``<run>/checkpoints/step_XXXXXXX/``): see ``checkpoint``: safetensors + a
``training_state.pt`` without FSDP, ``torch.distributed.checkpoint`` shards with it; every checkpoint
ends with a manifest of its files' sizes and SHA-256, resume verifies it and falls back to the newest
intact checkpoint. The final model (``final/``) is always a consolidated ``save_pretrained`` folder
(a LoRA run: the adapter folder; ``mdlm-ctc merge`` folds it into a full model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch

from . import data as data_mod
from . import distributed as dist_mod
from .checkpoint import (STATE_FILE, clean_temporaries, find_resumable, latest_checkpoint,  # noqa: F401
                         load_checkpoint, save_checkpoint)
from .config import Config, save_config
from .model import (DiffusionLM, SpecialIds, autocast_context, build_embedded_model, load_model_dir,
                    prepare_tokenizer, resolve_device, resolve_special_ids, save_model_dir)
from .objectives import collate, compute_loss, denominators, layout_length, resolve_fused_lm_head

DONE_FILE = "done.json"


# ------------------------------------------------------------------------------ distributed helpers
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def _all_reduce_sum(t: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(dist_info: Dist) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------ preparation
@dataclass
class Prepared:
    """What every run of a job shares: data, tokenizer, special ids and the initial weights."""

    tokenizer: object
    special: SpecialIds
    init_source: str            # a model folder, or the HF id/path of the base model
    train_rows: list
    eval_examples: list
    info: dict


def _fingerprint_rows(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt_ids, r.answer_ids]).encode())
    return h.hexdigest()[:16]


def prepare(cfg: Config, root: str, *, need_train: bool = True, log=print, is_main: bool = True) -> Prepared:
    """Load/generate the data, train or load the tokenizer, create the initial weights (once per job).

    With the embedded model the tokenizer is trained on the training data and the randomly initialised
    model is saved to ``<root>/init`` so that every run of the job starts from the same weights.
    """
    from .tokenizer import load_or_train_tokenizer

    os.makedirs(root, exist_ok=True)
    train_ex, eval_ex, info = data_mod.load_datasets(cfg, need_train=need_train)
    if is_main:
        data_dir = os.path.join(root, "data")
        os.makedirs(data_dir, exist_ok=True)
        if cfg.data.train_file is None:
            data_mod.write_jsonl(train_ex, os.path.join(data_dir, "train.jsonl"))
        if cfg.data.eval_file is None:
            data_mod.write_jsonl(eval_ex, os.path.join(data_dir, "eval.jsonl"))
    if cfg.train.init_from is not None:
        tokenizer, special = prepare_tokenizer(cfg.train.init_from, cfg)
        init_source = cfg.train.init_from
    elif cfg.model.model == "embedded":
        tok_dir = os.path.join(root, "tokenizer")
        tokenizer = load_or_train_tokenizer(data_mod.tokenizer_corpus(train_ex), cfg.model.tokenizer_vocab_size,
                                            tok_dir) if is_main or os.path.exists(tok_dir) else None
        if tokenizer is None:
            raise RuntimeError("the tokenizer must be prepared by the main process first")
        init_source = os.path.join(root, "init")
        hf = build_embedded_model(cfg, len(tokenizer), cfg.data.max_length + cfg.data.canvas_extra, cfg.run.seed)
        special = resolve_special_ids(hf, tokenizer, cfg)
        if is_main and not _same_init(init_source, hf):
            save_model_dir(hf, tokenizer, special, init_source, {"kind": "initial weights", "seed": cfg.run.seed})
    else:
        tokenizer, special = prepare_tokenizer(cfg.model.model, cfg)
        init_source = cfg.model.model
    rows, dropped = data_mod.encode_examples(train_ex, tokenizer, max_length=cfg.data.max_length,
                                             too_long=cfg.data.too_long, wrap_chat=cfg.data.wrap_chat,
                                             answer_end=special.answer_end) if need_train else ([], 0)
    info.update(train_examples=len(train_ex), train_rows=len(rows), dropped_too_long=dropped,
                eval_examples=len(eval_ex))
    if dropped and is_main:
        log(f"note: {dropped} training examples longer than max_length={cfg.data.max_length} were dropped")
    for key in ("skipped_train_lines", "skipped_eval_lines"):
        if info.get(key) and is_main:
            log(f"note: {info[key]} malformed lines skipped ({key.split('_')[1]} file, --skip-bad)")
    return Prepared(tokenizer, special, init_source, rows, eval_ex, info)


def _same_init(folder: str, hf) -> bool:
    """True when ``folder`` already holds exactly these initial weights."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        return False
    from safetensors.torch import load_file

    saved = load_file(path)
    current = hf.state_dict()
    return set(saved) <= set(current) and all(torch.equal(saved[k], current[k]) for k in saved)


# ------------------------------------------------------------------------------ schedule and optimizer
def lr_factor(step: int, cfg) -> float:
    """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "cosine":
        span = max(t.steps - t.warmup_steps, 1)
        progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(t.steps * t.wsd_decay_fraction)), 1)
    decay_start = t.steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - t.min_lr_ratio) * progress


def make_optimizer(model, cfg):
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler


# ------------------------------------------------------------------------------ resume
def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the loop
def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, leave=True)


def train_run(cfg: Config, prepared: Prepared, run_dir: str, *, objective: str | None = None,
              log=print) -> dict:
    """Train one model with ``objective`` into ``run_dir``; returns a summary (also written to ``done.json``).

    A run whose ``done.json`` exists is not trained again when ``resume`` is set.
    """
    objective = objective or cfg.objective.objective
    dist_info = init_distributed(cfg.run.device)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    t_cfg = cfg.train
    done_path = os.path.join(run_dir, DONE_FILE)
    if t_cfg.resume and os.path.exists(done_path):
        with open(done_path) as f:
            summary = json.load(f)
        if dist_info.main:
            log(f"[{objective}] {run_dir} already finished ({summary['steps']} steps); skipping (resume)")
        return summary
    per_rank, rem = divmod(t_cfg.batch_size, dist_info.world)
    if rem:
        raise ValueError(f"`batch_size` ({t_cfg.batch_size}) must be divisible by the number of processes "
                         f"({dist_info.world})")
    micro = t_cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"`micro_batch_size` ({micro}) must divide batch_size / processes ({per_rank})")
    accumulation = per_rank // micro

    os.makedirs(run_dir, exist_ok=True)
    mode = dist_mod.resolve_mode(t_cfg.distributed, dist_info.world)
    hf, _, special = load_model_dir(prepared.init_source, cfg, device)
    if special != prepared.special:
        raise ValueError(f"special ids of {prepared.init_source} ({special}) differ from the prepared ones "
                         f"({prepared.special})")
    hf.config.use_cache = False
    peft_model = None
    if t_cfg.lora:
        from .lora import apply_lora

        peft_model = apply_lora(hf, cfg, special.slack_id,  # adapters injected into ``hf`` in place
                                log=log if dist_info.main else None)
    if cfg.model.gradient_checkpointing:
        dist_mod.enable_activation_checkpointing(hf)
    net = DiffusionLM(hf).to(device)
    net.train()
    head = resolve_fused_lm_head(cfg.model.fused_lm_head, hf)
    if mode == "fsdp":
        dist_mod.apply_fsdp(net, hf, device, cfg.model.precision)
    optimizer, scheduler = make_optimizer(net, cfg)  # after sharding: the optimizer holds the shards
    sharded = net if mode == "fsdp" else None

    ckpt_root = os.path.join(run_dir, "checkpoints")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    rows = prepared.train_rows
    data_fp = _fingerprint_rows(rows)
    start_step = 0
    earlier_seconds = 0.0  # training time of the sessions before a resume
    if t_cfg.resume:
        ckpt = find_resumable(ckpt_root, warn=log if dist_info.main else (lambda *a, **k: None))
        if ckpt is not None:
            state = load_checkpoint(ckpt, hf, optimizer, scheduler, sharded_model=sharded,
                                    trainable_only=t_cfg.lora)
            if state["data"].get("fingerprint") != data_fp:
                raise ValueError(f"the training data differ from those of checkpoint {ckpt}; cannot resume")
            start_step = int(state["step"])
            earlier_seconds = float(state["data"].get("train_seconds", 0.0))
            if dist_info.main:
                log(f"[{objective}] resuming from {ckpt} (step {start_step})")
    _barrier(dist_info)
    if dist_info.main:
        if start_step == 0:
            with open(metrics_path, "w"):
                pass
            shutil.rmtree(ckpt_root, ignore_errors=True)
        else:
            _truncate_metrics(metrics_path, start_step)
        clean_temporaries(ckpt_root)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    _barrier(dist_info)

    model = dist_mod.wrap_ddp(net, device) if mode == "ddp" else net
    order = data_mod.GlobalOrder(len(rows), t_cfg.batch_size, cfg.run.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    keys = ("loss", "ce", "ctc", "mask_rate", "slack_fraction")
    window = torch.zeros(len(keys) + 1, dtype=torch.float64)
    window_steps = 0
    t_start = time.time()
    bar = _progress(t_cfg.steps, start_step, f"train {objective}", cfg.run.progress and dist_info.main)
    metrics_file = open(metrics_path, "a") if dist_info.main else None
    last = {}
    try:
        for step in range(start_step, t_cfg.steps):
            global_rows = [rows[i] for i in order.batch(step)]
            length = layout_length(global_rows, cfg.data)
            denoms = denominators(global_rows, length)
            mine = list(range(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank))
            step_stats = torch.zeros(len(keys), dtype=torch.float64)
            for k in range(accumulation):
                positions = mine[k * micro:(k + 1) * micro]
                batch = collate([global_rows[j] for j in positions], length, special.eos_id,
                                [data_mod.noise_seed(cfg.run.seed, step, j) for j in positions])
                with dist_mod.gradient_sync(model, mode, enabled=k == accumulation - 1):
                    with autocast_context(cfg.model.precision, device):
                        loss, stats = compute_loss(model, batch, objective=objective, special=special,
                                                   obj_cfg=cfg.objective, denoms=denoms, head=head, align_model=net,
                                                   device=device)
                    (loss * dist_info.world).backward()
                step_stats[0] += float(loss.detach())
                for i, key in enumerate(keys[1:], 1):
                    if key in stats:
                        value = float(stats[key])
                        step_stats[i] += value * (len(positions) / t_cfg.batch_size if key in ("mask_rate",
                                                                                               "slack_fraction")
                                                  else 1.0)
            _all_reduce_sum(step_stats, dist_info)
            if not math.isfinite(float(step_stats[0])):
                raise FloatingPointError(f"[{objective}] non-finite loss at step {step + 1}: {float(step_stats[0])}")
            clip = t_cfg.grad_clip if t_cfg.grad_clip > 0 else float("inf")
            grad_norm = dist_mod.clip_grad_norm(params, clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window[: len(keys)] += step_stats
            window[len(keys)] += grad_norm
            window_steps += 1
            done_steps = step + 1
            if dist_info.main:
                bar.update(1)
                bar.set_postfix(loss=f"{float(step_stats[0]):.4f}", refresh=False)
            if done_steps % t_cfg.log_every == 0 or done_steps == t_cfg.steps:
                mean = window / window_steps
                last = {"step": done_steps, "loss": float(mean[0])}
                for i, key in enumerate(keys[1:], 1):
                    if key == "ce" and objective == "ctc" or key in ("ctc", "slack_fraction") and objective == "ce":
                        continue
                    last[key] = float(mean[i])
                last.update(lr=lr, grad_norm=float(mean[len(keys)]), epoch=round(order.epoch_of(done_steps), 4),
                            elapsed_s=round(time.time() - t_start, 2))
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                window.zero_()
                window_steps = 0
            if t_cfg.checkpoint_every and done_steps % t_cfg.checkpoint_every == 0 and done_steps < t_cfg.steps:
                save_checkpoint(ckpt_root, done_steps, hf, optimizer, scheduler,
                                {"step": done_steps, "rows_seen": done_steps * t_cfg.batch_size,
                                 "epoch": order.epoch_of(done_steps), "fingerprint": data_fp,
                                 "train_seconds": earlier_seconds + time.time() - t_start},
                                t_cfg.keep_checkpoints, cfg.to_dict(), sharded_model=sharded,
                                trainable_only=t_cfg.lora)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    elapsed = time.time() - t_start
    summary = {"objective": objective, "steps": t_cfg.steps, "resumed_from": start_step,
               "train_seconds": round(earlier_seconds + elapsed, 1), "session_seconds": round(elapsed, 1),
               "final": last, "world_size": dist_info.world, "threads": torch.get_num_threads(),
               "fused_lm_head": head is not None, "device": str(device)}
    _save_final(net, hf, peft_model, sharded, prepared, special, os.path.join(run_dir, "final"),
                {"objective": objective, "steps": t_cfg.steps, "seed": cfg.run.seed,
                 **({"synthetic_max_len": cfg.data.synthetic_max_len} if cfg.data.train_file is None else {})},
                dist_info)
    if dist_info.main:
        tmp = f"{done_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, done_path)
    _barrier(dist_info)
    return summary


def _save_final(net, hf, peft_model, sharded, prepared, special, path: str, extra: dict, dist_info) -> None:
    """The consolidated final model (FSDP: gathered to rank 0), or the adapter folder of a LoRA run."""
    full = dist_mod.full_model_state_dict(net) if sharded is not None else None  # every rank takes part
    if not dist_info.main:
        return
    if peft_model is not None:
        from .lora import save_adapter

        peft_sd = None if full is None else {f"base_model.model.{k}": v for k, v in full.items()}
        save_adapter(peft_model, prepared.tokenizer, special, path, prepared.init_source, extra, state_dict=peft_sd)
    else:
        save_model_dir(hf, prepared.tokenizer, special, path, extra, state_dict=full)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
