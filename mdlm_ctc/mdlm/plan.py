"""The memory plan: per-GPU bytes of a training job, from the model's config alone (``mdlm-ctc plan``).

Nothing is loaded but ``config.json`` (or, for the embedded model, the ``tiny_*`` options). For each
setting (``ddp``, ``fsdp``, ``lora``, ``lora+fsdp``) at the job's world size the plan estimates, per
process:

* **LoRA's trainable parameters**: the job's ``lora_target_modules`` resolved by ``lora``'s own rules
  on the linear layers the config implies (module paths of Llama-style models or of LLaDA's code), so
  the count is the one peft reports for the loaded model;
* **weights**: full fine-tuning keeps fp32 master weights (4 B/param); on GPU, bf16 autocast caches a
  2 B copy of every weight it casts for the whole forward (DDP), while FSDP2 with
  ``MixedPrecisionPolicy(param_dtype=bf16)`` holds the fp32 shard (4/N B) plus the all-gathered bf16
  root group (embeddings, LM head: unsharded from forward to backward) and two decoder layers (the
  one computing and the one prefetched). LoRA: the frozen base at its load dtype (bf16 on GPU, fp32
  on CPU), plus the fp32 adapters.
* **gradients**: 4 B per trainable parameter (sharded 1/N under FSDP, plus the unsharded root group and
  one layer in bf16 while they are reduced).
* **optimizer**: AdamW's two fp32 moments, 8 B per trainable parameter (1/N under FSDP).
* **activations** of one micro-batch (``micro_batch_size * max_length`` tokens), saved for backward:
  per token and layer ``(8 h + 3 kv + 4 I) * a`` bytes (RMSNorm inputs and outputs, q, k, v and their
  rotary copies, attention output and the o-projection input; gate, up, SiLU output and their product;
  ``a`` = 2 on GPU under bf16, 4 on CPU), plus ``2 heads * L`` per token with ``eager`` attention (the
  score matrix and its softmax). With gradient checkpointing only each layer's input ``h * a`` is
  kept, plus one layer's full activations while it is recomputed. Both figures are always printed.
* **logits or the fused head**: materialised logits ``tokens * V`` in the compute dtype, their fp32
  log-softmax and fp32 gradient (``tokens * V * (a + 8)``); the fused LM head
  (``linear_slack_ctc_loss``) instead holds one chunk of logits at its default size
  (``linear.default_chunk_size``: 256 MiB of logits, 1,024 frames in bf16 at V = 126,464) and its gradient
  (``2 * chunk * V * a``) plus the fp32 accumulator ``4 * min(tokens, V) * h``.

A job whose chosen setting exceeds ``gpu_memory_gb`` is refused (by ``plan`` and at the start of
``train`` on GPU) with a message naming a setting that would fit. The figures are estimates: they are
checked against measured peaks of the embedded model on CPU (``tests/test_mdlm_plan.py``: within
25%) and against hand-computed figures for an 8B config; allocator fragmentation, NCCL buffers and
the CUDA context (~1-2 GiB) are not included, hence a default 10% headroom.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..linear import default_chunk_size

GIB = 1024 ** 3
HEADROOM = 0.9          # a plan "fits" when its total is at most 90% of the GPU's memory

# the linear layers of one decoder layer, by module path under the layer, as (in, out) of (h, kv, I); and
# where the layers and the LM head sit: Hugging Face Llama-style models (Llama, Qwen2, Dream, the
# embedded model) and LLaDA's own code (OLMo-style ``model.transformer.blocks``, LLaDALlamaBlock)
_LAYOUTS = {
    "llama": ("model.layers.{i}.", "lm_head", {
        "self_attn.q_proj": lambda h, kv, i: (h, h), "self_attn.k_proj": lambda h, kv, i: (h, kv),
        "self_attn.v_proj": lambda h, kv, i: (h, kv), "self_attn.o_proj": lambda h, kv, i: (h, h),
        "mlp.gate_proj": lambda h, kv, i: (h, i), "mlp.up_proj": lambda h, kv, i: (h, i),
        "mlp.down_proj": lambda h, kv, i: (i, h)}),
    "llada": ("model.transformer.blocks.{i}.", "model.transformer.ff_out", {
        "q_proj": lambda h, kv, i: (h, h), "k_proj": lambda h, kv, i: (h, kv), "v_proj": lambda h, kv, i: (h, kv),
        "attn_out": lambda h, kv, i: (h, h), "ff_proj": lambda h, kv, i: (h, i), "up_proj": lambda h, kv, i: (h, i),
        "ff_out": lambda h, kv, i: (i, h)}),
}


@dataclass
class ModelShape:
    """What the plan needs to know about a decoder-only transformer."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    source: str = ""
    layout: str = "llama"   # a key of _LAYOUTS: where the linear layers sit, by module path

    @property
    def head_path(self) -> str | None:
        """Module path of the LM head (``None`` when tied to the input embedding)."""
        return None if self.tied else _LAYOUTS[self.layout][1]

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """``{full module path: (in, out)}`` of the linear layers the model has (what ``lora.linear_layers``
        reads from the loaded model), the LM head included unless tied."""
        prefix, head, per_layer = _LAYOUTS[self.layout]
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        layers = {prefix.format(i=n) + name: shape(h, kv, i) for n in range(self.layers)
                  for name, shape in per_layer.items()}
        if not self.tied:
            layers[head] = (h, self.vocab)
        return layers

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms

    @property
    def root_params(self) -> int:
        """Embeddings, LM head and the final norm: FSDP2's root group."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


def _first(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is not None:
        return default
    raise ValueError(f"the model config has none of {', '.join(names)}; cannot plan its memory")


def shape_from_config(config: dict, source: str = "") -> ModelShape:
    """A :class:`ModelShape` from a ``config.json`` dict (Llama-style or LLaDA/OLMo-style keys)."""
    hidden = int(_first(config, "hidden_size", "d_model", "n_embd"))
    heads = int(_first(config, "num_attention_heads", "n_heads"))
    layout = "llada" if config.get("hidden_size") is None and config.get("d_model") is not None else "llama"
    if layout == "llada" and config.get("block_type", "llama") != "llama":
        raise ValueError(f"the model config has block_type {config['block_type']!r}; the plan knows LLaDA's 'llama' "
                         f"blocks only")
    return ModelShape(
        hidden=hidden, layers=int(_first(config, "num_hidden_layers", "n_layers")), heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", "n_kv_heads", default=heads)),
        intermediate=int(_first(config, "intermediate_size", "mlp_hidden_size", default=4 * hidden)),
        vocab=int(_first(config, "embedding_size", "vocab_size")),
        tied=bool(_first(config, "tie_word_embeddings", "weight_tying", default=False)), source=source,
        layout=layout)


def model_shape(cfg, root: str | None = None) -> ModelShape:
    """The shape of the job's model: its ``config.json`` only (the embedded model: the job's ``init``
    folder when it exists, else the ``tiny_*`` options with the tokenizer's maximum vocabulary)."""
    m = cfg.model
    path = cfg.train.init_from or (m.model if m.model != "embedded" else None)
    if path is None:
        init = os.path.join(root or cfg.run_dir(), "init", "config.json")
        if os.path.isfile(init):
            with open(init) as f:
                return shape_from_config(json.load(f), init)
        return ModelShape(hidden=m.tiny_hidden_size, layers=m.tiny_layers, heads=m.tiny_heads,
                          kv_heads=m.tiny_kv_heads, intermediate=m.tiny_intermediate_size,
                          vocab=m.tokenizer_vocab_size + 4, tied=False, source="tiny_* options")
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            return shape_from_config(json.load(f), os.path.join(path, "config.json"))
    if os.path.sep in path or path.startswith("."):
        raise ValueError(f"`model` {path!r}: no config.json there to plan from")
    from transformers import AutoConfig  # a Hub id: the config only, never the weights

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    except OSError as err:
        raise ValueError(f"`model` {path!r}: cannot read its config to plan from ({err})") from None
    return shape_from_config(config.to_dict(), path)


def lora_params(shape: ModelShape, rank: int, targets: str) -> int:
    """Trainable parameters of LoRA at ``rank`` on ``targets`` (``lora_target_modules``), plus the slack rows.

    The targets are resolved exactly as ``lora.apply_lora`` resolves them on the loaded model (same
    function, on :meth:`ModelShape.linear_layers`): ``r * (in + out)`` per adapted layer, and one
    ``hidden``-sized slack row in the embedding and one in the head unless tied.
    """
    from .lora import resolve_lora_targets

    layers = shape.linear_layers()
    paths, _ = resolve_lora_targets(targets, layers, shape.head_path, f"the model of {shape.source or 'this job'}")
    return sum(rank * (layers[p][0] + layers[p][1]) for p in paths) + shape.hidden * (1 if shape.tied else 2)


@dataclass
class Estimate:
    """Bytes per process of one setting; ``activations`` with the job's checkpointing choice."""

    setting: str
    weights: float
    gradients: float
    optimizer: float
    activations_full: float
    activations_checkpointed: float
    head: float
    gradient_checkpointing: bool
    notes: list = field(default_factory=list)

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.head


@dataclass
class Job:
    """The job's numbers that memory depends on."""

    shape: ModelShape
    world: int
    tokens: int             # per micro-batch per process
    seq_len: int
    gpu: bool
    fused_head: bool
    gradient_checkpointing: bool
    eager_attention: bool
    lora_rank: int
    lora_targets: str       # ``lora_target_modules``
    base_bytes: int         # bytes per frozen base weight under LoRA


def _activations(job: Job) -> tuple[float, float]:
    s, a = job.shape, 2 if job.gpu else 4
    per_token_layer = (8 * s.hidden + 3 * s.kv_dim + 4 * s.intermediate) * a
    if job.eager_attention:
        per_token_layer += 2 * s.heads * job.seq_len * a
    full = job.tokens * s.layers * per_token_layer
    checkpointed = job.tokens * s.layers * s.hidden * a + job.tokens * per_token_layer
    return float(full), float(checkpointed)


def _head(job: Job) -> float:
    s, a = job.shape, 2 if job.gpu else 4
    if job.fused_head:
        chunk = min(default_chunk_size(s.vocab, a), job.tokens)  # the fused loss's default chunk
        return float(2 * chunk * s.vocab * a + 4 * min(job.tokens, s.vocab) * s.hidden)
    return float(job.tokens * s.vocab * (a + 8))


def estimate(job: Job, setting: str) -> Estimate:
    """Per-process bytes of ``setting`` (``ddp``, ``fsdp``, ``lora`` or ``lora+fsdp``) for ``job``."""
    s, n = job.shape, job.world
    p, root, layer = s.params, s.root_params, s.layer_params
    act_full, act_ckpt = _activations(job)
    head = _head(job)
    sharded = setting in ("fsdp", "lora+fsdp") and n > 1
    notes = []
    if setting in ("ddp", "fsdp"):
        if sharded:
            gathered = 2 * (root + 2 * layer) if job.gpu else 4 * (root + 2 * layer)
            weights = 4 * p / n + gathered
            gradients = 4 * p / n + (2 if job.gpu else 4) * (root + layer)  # + unsharded, before reduce-scatter
            optimizer = 8 * p / n
        else:
            weights = 4 * p + (2 * p if job.gpu else 0)  # fp32 master + bf16 autocast cache on GPU
            gradients, optimizer = 4 * p, 8 * p
    else:
        trainable = lora_params(s, job.lora_rank, job.lora_targets)
        base = job.base_bytes * p
        if sharded:
            base = job.base_bytes * p / n + (2 if job.gpu else 4) * (root + 2 * layer)
        weights = base + 4 * trainable + (2 * trainable if job.gpu else 0)
        gradients, optimizer = 4 * trainable, 8 * trainable
        notes.append(f"{trainable / 1e6:.1f}M trainable parameters (LoRA r={job.lora_rank} on "
                     f"{job.lora_targets} + slack rows)")
    return Estimate(setting, float(weights), float(gradients), float(optimizer), act_full, act_ckpt, head,
                    job.gradient_checkpointing, notes)


@dataclass
class Plan:
    job: Job
    chosen: str
    estimates: dict
    gpu_memory_gb: float
    suggestion: str | None = None
    skipped: str | None = None  # why the LoRA settings are not estimated (their targets do not fit the model)

    @property
    def fits(self) -> bool | None:
        """Whether the chosen setting fits ``gpu_memory_gb`` (``None``: not checked, or a CPU job)."""
        if not self.gpu_memory_gb or not self.job.gpu:
            return None
        return self.estimates[self.chosen].total <= HEADROOM * self.gpu_memory_gb * GIB

    def render(self) -> str:
        j, s = self.job, self.job.shape
        lines = [f"memory plan per {'GPU' if j.gpu else 'process'} (estimates, GiB; model from {s.source}):",
                 f"  model: {s.params / 1e9:.3f}B parameters ({s.layers} layers, hidden {s.hidden}, MLP "
                 f"{s.intermediate}, vocab {s.vocab}{', tied' if s.tied else ''}); {j.world} process(es), "
                 f"{j.tokens} tokens per micro-batch, {'bf16 on GPU' if j.gpu else 'fp32 on CPU'}, "
                 f"{'fused LM head' if j.fused_head else 'materialised logits'}",
                 f"  {'setting':<10} {'weights':>8} {'grads':>8} {'optim':>8} {'act':>8} {'act(ckpt)':>9} "
                 f"{'head':>8} {'total':>8}"]
        for name, e in self.estimates.items():
            mark = " <- this job" if name == self.chosen else ""
            lines.append(f"  {name:<10} {e.weights / GIB:8.2f} {e.gradients / GIB:8.2f} {e.optimizer / GIB:8.2f} "
                         f"{e.activations_full / GIB:8.2f} {e.activations_checkpointed / GIB:9.2f} "
                         f"{e.head / GIB:8.2f} {e.total / GIB:8.2f}{mark}")
        if self.skipped:
            lines.append(f"  lora, lora+fsdp: not estimated ({self.skipped})")
        chosen = self.estimates[self.chosen]
        lines.append(f"  total uses activations {'with' if j.gradient_checkpointing else 'without'} gradient "
                     f"checkpointing; {'; '.join(chosen.notes) if chosen.notes else ''}".rstrip("; "))
        if self.fits is not None:
            budget = HEADROOM * self.gpu_memory_gb
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {self.chosen}: {chosen.total / GIB:.2f} GiB of {budget:.1f} usable "
                         f"({self.gpu_memory_gb:g} GiB GPU, {int(HEADROOM * 100)}%): {verdict}")
        if self.suggestion:
            lines.append(f"  {self.suggestion}")
        return "\n".join(lines)

    def refusal(self) -> str:
        chosen = self.estimates[self.chosen]
        return (f"this job needs about {chosen.total / GIB:.1f} GiB per GPU with {self.chosen}, more than the "
                f"{HEADROOM * self.gpu_memory_gb:.1f} GiB usable of a {self.gpu_memory_gb:g} GiB GPU "
                f"(`gpu_memory_gb`); {self.suggestion or 'no setting of this plan fits: use more GPUs'}")


def chosen_setting(cfg, world: int) -> str:
    from .distributed import resolve_mode

    mode = resolve_mode(cfg.train.distributed, world)
    if cfg.train.lora:
        return "lora+fsdp" if mode == "fsdp" else "lora"
    return "fsdp" if mode == "fsdp" else "ddp"


def _suggest(estimates: dict, job: Job, chosen: str, budget: float) -> str | None:
    """The first change, as options, that fits: checkpointing alone, then another setting (with or without)."""
    options = {"ddp": "--distributed ddp", "fsdp": "--distributed fsdp", "lora": "--lora",
               "lora+fsdp": "--lora --distributed fsdp"}
    ckpt_choices = [True] if job.gradient_checkpointing else [False, True]
    for name in [chosen, *(n for n in ("fsdp", "lora+fsdp", "lora", "ddp") if n != chosen and n in estimates)]:
        e = estimates[name]
        for ckpt in ckpt_choices:
            if name == chosen and ckpt == job.gradient_checkpointing:
                continue
            need = e.total - e.activations + (e.activations_checkpointed if ckpt else e.activations_full)
            if need <= budget:
                flags = ([options[name]] if name != chosen else []) + (
                    ["--gradient-checkpointing"] if ckpt and not job.gradient_checkpointing else [])
                return f"{' '.join(flags)} would fit ({need / GIB:.1f} GiB per GPU)"
    return None


def plan_job(cfg, *, world: int | None = None, gpu: bool | None = None, root: str | None = None) -> Plan:
    """The memory plan of ``cfg``'s training job (see the module docstring)."""
    t, m = cfg.train, cfg.model
    world = world or t.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if gpu is None:  # plan for GPUs unless the job says cpu (plans are often made on a machine without one)
        gpu = cfg.run.device != "cpu"
    shape = model_shape(cfg, root)
    per_rank = max(t.batch_size // world, 1)
    micro = t.micro_batch_size or per_rank
    fused = m.fused_lm_head == "on" or (m.fused_lm_head == "auto" and shape.vocab >= 32768)
    fused = fused and cfg.objective.objective != "ce"
    base_bytes = 4 if (not gpu or m.load_dtype == "float32") else 2
    job = Job(shape=shape, world=world, tokens=micro * cfg.data.max_length, seq_len=cfg.data.max_length, gpu=gpu,
              fused_head=fused, gradient_checkpointing=m.gradient_checkpointing,
              eager_attention=m.attn_implementation == "eager", lora_rank=t.lora_rank,
              lora_targets=t.lora_target_modules, base_bytes=base_bytes)
    chosen = chosen_setting(cfg, world)
    estimates, skipped = {name: estimate(job, name) for name in ("ddp", "fsdp")}, None
    try:
        estimates.update({name: estimate(job, name) for name in ("lora", "lora+fsdp")})
    except ValueError as err:  # the LoRA targets do not fit this model: an error only for a LoRA job
        if chosen.startswith("lora"):
            raise
        skipped = str(err)
    plan = Plan(job, chosen, estimates, t.gpu_memory_gb, skipped=skipped)
    if plan.fits is False:
        plan.suggestion = _suggest(estimates, job, chosen, HEADROOM * t.gpu_memory_gb * GIB)
    return plan
