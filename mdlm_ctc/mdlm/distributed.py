"""Data parallelism for the loop: none, DDP (small models) or FSDP2 (``fully_shard``).

**FSDP2** (``--distributed fsdp`` under ``torchrun``): ``fully_shard`` on every decoder layer (the
classes the model names in ``_no_split_modules``, the unit accelerate and NeMo wrap too) and at the
root, the :class:`~mdlm_ctc.mdlm.model.DiffusionLM` wrapper, whose group then holds the embeddings, the
final norm and the LM head. Parameters, gradients and AdamW's state are sharded over the processes;
each process keeps only ``1/N`` of them plus the layer being computed. Mixed precision: bf16 parameters
with fp32 gradient reduction on GPU (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, the
sharded master weights stay fp32); fp32 throughout on CPU (gloo).

**How the fused LM-head loss sees a sharded head weight.** FSDP2 all-gathers the root group's
parameters in the root's pre-forward and, for the root, keeps them unsharded until its backward (it
does not reshard the root after forward, since backward needs them at once). During that window the
module's ``weight`` attribute *is* the unsharded ``nn.Parameter`` (a plain tensor), so the loop reads
the head weight lazily (:class:`~mdlm_ctc.mdlm.model.LMHead` looks the attribute up at each use) right
after the forward and ``linear_slack_ctc_loss`` receives an ordinary full tensor; its gradient lands on
the unsharded parameter and FSDP's post-backward reduce-scatters it into the shards like every other
gradient. No extra gather, no copy of the head per call. (``linear_slack_ctc_loss`` also accepts a
sharded ``DTensor`` weight directly, for callers outside an FSDP forward: see ``mdlm_ctc.linear``.)

Gradient accumulation: gradient sync (DDP ``no_sync``, FSDP ``set_requires_gradient_sync(False)``) only
on the last micro-batch. Clipping: ``clip_grad_norm_`` over the sharded gradients (a DTensor norm,
identical on every rank). Both data-parallel wrappers average gradients over processes, so the loop
multiplies each micro-batch loss by the number of processes (see ``train``).
"""

from __future__ import annotations

import contextlib

import torch

MODES = ("auto", "none", "ddp", "fsdp")


def resolve_mode(setting: str, world: int) -> str:
    """``none`` / ``ddp`` / ``fsdp`` for a run of ``world`` processes."""
    if setting not in MODES:
        raise ValueError(f"`distributed` must be one of {', '.join(map(repr, MODES))}; got {setting!r}")
    if setting == "auto":
        return "ddp" if world > 1 else "none"
    if setting == "ddp" and world == 1:
        return "none"
    return setting


def decoder_layers(hf_model) -> list[torch.nn.Module]:
    """The model's decoder layers: modules whose class is in ``_no_split_modules``, else the longest ModuleList."""
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    layers = [m for m in hf_model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in hf_model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder layers of {type(hf_model).__name__} to shard (no "
                         f"_no_split_modules and no ModuleList); use --distributed ddp")
    return list(max(lists, key=len))


def enable_activation_checkpointing(hf_model) -> str:
    """Recompute activations in backward; returns which mechanism is used.

    transformers' own switch when the model has one (``supports_gradient_checkpointing``); otherwise
    torch's composable ``checkpoint`` (non-reentrant) on every decoder layer, which FSDP2's
    ``fully_shard`` composes with: LLaDA's remote code has no transformers switch. It adds hooks and no
    wrapper module, so module names, parameter names and state-dict keys stay the model's own (peft finds
    its adapters by module name when it saves them, and a ``checkpoint_wrapper`` would hide them). Apply
    it after LoRA and before ``fully_shard``.
    """
    if getattr(hf_model, "supports_gradient_checkpointing", False):
        hf_model.gradient_checkpointing_enable()
        return "transformers"
    from torch.distributed._composable import checkpoint

    for layer in decoder_layers(hf_model):
        checkpoint(layer)
    return "composable checkpoint"


def mixed_precision_policy(device: torch.device, precision: str):
    """bf16 parameters + fp32 reduction on CUDA (precision auto/bf16); fp32 everywhere else."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and precision in ("auto", "bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(net: torch.nn.Module, hf_model, device: torch.device, precision: str) -> torch.nn.Module:
    """``fully_shard`` every decoder layer of ``hf_model``, then ``net`` (the root); returns ``net``."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(device, precision)
    for layer in decoder_layers(hf_model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(net, mp_policy=policy)
    return net


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model, mode: str, enabled: bool):
    """A context in which backward does (``enabled``) or does not yet reduce gradients across processes."""
    if enabled or mode == "none":
        return contextlib.nullcontext()
    if mode == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)

    @contextlib.contextmanager
    def _restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return _restore()


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global gradient norm (sharded gradients included); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_model_state_dict(net: torch.nn.Module, prefix: str = "hf.") -> dict:
    """The consolidated (unsharded, CPU) weights of an FSDP-sharded ``net``; complete on rank 0 only.

    Keys are those of the Hugging Face model (``prefix`` stripped), ready for ``save_pretrained``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
