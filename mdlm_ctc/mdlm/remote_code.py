"""Loading a model's own code (``--trust-remote-code``) under the transformers this package requires.

LLaDA's and Dream's published modeling files were written for transformers 4.38-4.46; this package
needs transformers >= 5.24 (the embedded model's bidirectional Llama, ``is_causal=False``, exists only
there). Rather than pinning an old transformers for everyone, or asking users to edit the files they
downloaded, the loader applies a small compatibility layer **to the loaded classes, in memory, at run
time**: the files on disk (and in the Hub cache) are never touched, and a folder saved afterwards
carries the model's code unchanged. Each shim is tied to a trait of transformers 4.x code that
transformers 5 no longer accepts, fires only where the trait is present, and is reported once:

* ``post_init``: transformers 5 reads attributes that ``PreTrainedModel.post_init()`` sets (e.g.
  ``all_tied_weights_keys``) while loading; a model whose ``__init__`` never calls it (LLaDA's
  ``LLaDAModelLM``) gets it called after its own ``__init__``;
* ``tie_weights(**kwargs)``: transformers 5 calls ``tie_weights(missing_keys=..., recompute_mapping=...)``;
  a model that overrides ``tie_weights(self)`` (LLaDA) keeps its own tying and ignores the new arguments;
* ``config.use_cache``: transformers 5 drops generation parameters, ``use_cache`` included, from a model
  config when it is built; a model whose forward reads ``config.use_cache`` (LLaDA) gets the value of
  the folder's ``config.json`` back (``False`` when it has none: a masked diffusion LM has no KV cache);
* ``rope 'default'``: a modeling module that looks up ``ROPE_INIT_FUNCTIONS["default"]`` (Dream, as
  Qwen2's code of transformers 4.x did) gets a module-local table with the standard RoPE frequencies
  (``inv_freq = theta ** (-2i / dim)``), which transformers 5 computes elsewhere;
* ``rotary inv_freq``: transformers 5 builds the model on the meta device and re-initialises only the
  rotary modules it recognises; a rotary embedding of the model's own code with a non-persistent
  ``inv_freq`` buffer (Dream's) would keep uninitialised memory there (silently wrong positions), so
  after loading the buffer is recomputed with the module's own ``rope_init_fn``;
* ``GenerationConfig.validate(**kwargs)``: transformers 5 calls ``validate(strict=..., user_set_attributes=...)``;
  a ``GenerationConfig`` subclass of the model's code that overrides ``validate(self, is_init=False)``
  (Dream's ``DreamGenerationConfig``) is given only the arguments it declares.

A model that still cannot be loaded stops with a one-line :class:`RemoteCodeError` naming the model,
its class, the transformers version it was written for and the one installed, and what to do.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

#: the Auto classes tried for a model's own code, in order (the first its ``auto_map`` names is used)
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")

_APPLIED = "_mdlm_ctc_shims"  # per class: the shims that fired (for the report line)


class RemoteCodeError(ValueError):
    """A model's own code cannot be loaded with the installed transformers (one line: model, versions, fix)."""


def remote_class_reference(config) -> tuple[str, str] | None:
    """``(auto class name, "module.Class")`` of the first of :data:`AUTO_CLASSES` in the config's ``auto_map``."""
    auto_map = getattr(config, "auto_map", None) or {}
    for name in AUTO_CLASSES:
        if name in auto_map:
            reference = auto_map[name]
            return name, reference[0] if isinstance(reference, (list, tuple)) else reference
    return None


def needs_own_code(raw: dict) -> bool:
    """A ``config.json`` (as a dict) whose model can only be built by the folder's own code: it has an
    ``auto_map`` and a ``model_type`` transformers does not ship (LLaDA's ``llada``, Dream's ``Dream``).

    Decided from the file, not from transformers' registries: remote code that registers itself (LLaDA's
    does) would otherwise make a second load in the same process look like built-in code.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return bool(raw.get("auto_map")) and raw.get("model_type") not in CONFIG_MAPPING_NAMES


# ------------------------------------------------------------------------------ the shims
def _record(cls, shim: str) -> None:
    applied = cls.__dict__.get(_APPLIED)
    if applied is None:
        applied = []
        setattr(cls, _APPLIED, applied)
    if shim not in applied:
        applied.append(shim)


def _shim_post_init(cls) -> None:
    """Call ``post_init()`` after the model's own ``__init__`` when that never did."""
    if cls.__dict__.get("_mdlm_ctc_post_init_shim"):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # (also on the subclass transformers derives from a remote class to add GenerationMixin)
        if not hasattr(self, "all_tied_weights_keys"):  # post_init() never ran
            _record(cls, "post_init")
            self.post_init()

    cls.__init__ = __init__
    cls._mdlm_ctc_post_init_shim = True


def _accepts_tie_kwargs(method) -> bool:
    parameters = inspect.signature(method).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) or \
        {"missing_keys", "recompute_mapping"} <= {p.name for p in parameters}


def _shim_tie_weights(cls) -> None:
    """Let a 4.x ``tie_weights(self)`` override be called with transformers 5's keyword arguments."""
    from transformers import PreTrainedModel

    own = cls.tie_weights
    if own is PreTrainedModel.tie_weights or _accepts_tie_kwargs(own):
        return

    @functools.wraps(own)
    def tie_weights(self, *args, **kwargs):
        return own(self)  # the model's own tying; transformers 5's arguments do not apply to it

    cls.tie_weights = tie_weights
    _record(cls, "tie_weights(**kwargs)")


def _default_rope_parameters(config=None, device=None, seq_len=None, **rope_kwargs):
    """Standard RoPE: ``inv_freq[i] = theta ** (-2i / dim)`` and attention scaling 1."""
    if config is not None:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    else:
        theta, dim = rope_kwargs["base"], rope_kwargs["dim"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (theta ** exponents), 1.0


def _shim_rope_default(cls) -> None:
    """A modeling module that still looks up RoPE's 'default' initialiser gets a module-local table with it."""
    module = sys.modules.get(cls.__module__)
    table = getattr(module, "ROPE_INIT_FUNCTIONS", None)
    if not isinstance(table, dict) or "default" in table:
        return
    module.ROPE_INIT_FUNCTIONS = {**table, "default": _default_rope_parameters}
    _record(cls, "rope 'default'")


def _shim_rotary_buffers(model) -> list[str]:
    """Recompute the rotary ``inv_freq`` buffers of a loaded model with each module's own ``rope_init_fn``.

    They are not in the checkpoint (non-persistent), and transformers 5, which builds the model on the
    meta device, re-initialises only the rotary modules it recognises; others keep uninitialised memory.
    """
    fixed = False
    for module in model.modules():
        rope_init = getattr(module, "rope_init_fn", None)
        buffer = module._buffers.get("inv_freq") if callable(rope_init) else None
        if buffer is None or getattr(module, "config", None) is None:
            continue
        inv_freq, _ = rope_init(module.config, buffer.device, **getattr(module, "rope_kwargs", {}))
        inv_freq = inv_freq.to(buffer.dtype)
        if not torch.equal(buffer, inv_freq):
            with torch.no_grad():
                buffer.copy_(inv_freq)
            fixed = True
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq = buffer.clone()
    return ["rotary inv_freq"] if fixed else []


def _shim_generation_validate(cls) -> None:
    """A 4.x ``GenerationConfig`` subclass of the model's code gets only the ``validate`` arguments it declares."""
    from transformers import GenerationConfig

    module = sys.modules.get(cls.__module__)
    for candidate in list(vars(module).values()) if module is not None else ():
        if not (isinstance(candidate, type) and issubclass(candidate, GenerationConfig)) or \
                candidate is GenerationConfig or "validate" not in vars(candidate):
            continue
        own = vars(candidate)["validate"]
        declared = inspect.signature(own).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in declared.values()):
            continue

        def validate(self, *args, _own=own, _declared=tuple(declared), **kwargs):
            return _own(self, **{k: v for k, v in kwargs.items() if k in _declared})

        candidate.validate = functools.wraps(own)(validate)
        _record(cls, f"{candidate.__name__}.validate(**kwargs)")


def _shim_config(config, raw: dict) -> list[str]:
    """Give a config back the ``use_cache`` that transformers 5 drops from model configs."""
    if hasattr(config, "use_cache"):
        return []
    config.use_cache = bool(raw.get("use_cache", False))
    return ["config.use_cache"]


def patch_class(cls) -> None:
    """Apply every shim whose trait ``cls`` (a model class from a model's own code) has; idempotent."""
    _shim_post_init(cls)
    _shim_tie_weights(cls)
    _shim_rope_default(cls)
    _shim_generation_validate(cls)


def applied_shims(cls) -> list[str]:
    """The shims that have fired for ``cls`` so far (in this process)."""
    return list(getattr(cls, _APPLIED, []))


# ------------------------------------------------------------------------------ loading
def load_remote_model(path: str, config, **kwargs):
    """The model of ``path`` from its own code, through :func:`patch_class`; ``(model, shims applied)``.

    ``config`` is the folder's ``AutoConfig`` (loaded with ``trust_remote_code``); ``kwargs`` go to
    ``from_pretrained``. Raises :class:`RemoteCodeError` when the model still cannot be loaded.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    found = remote_class_reference(config)
    if found is None:
        raise ValueError(f"`model` {path!r}: its config's auto_map names none of {', '.join(AUTO_CLASSES)}")
    auto_name, reference = found
    written_for = getattr(config, "transformers_version", None) or "an unknown version"
    try:
        cls = get_class_from_dynamic_module(reference, path)
        patch_class(cls)
        raw, _ = type(config).get_config_dict(path)  # config.json as written (transformers 5 dropped keys)
        config_shims = _shim_config(config, raw)
        # the folder's own class, not whatever an Auto class finds registered: remote code that registers
        # itself (LLaDA's does) would otherwise make the first folder's class load every later one
        cls.register_for_auto_class(auto_name)  # save_pretrained then copies the modeling file along
        model = cls.from_pretrained(path, config=config, **kwargs)
        config_shims += _shim_rotary_buffers(model)
    except Exception as err:  # noqa: BLE001  (whatever the model's code raises under transformers 5)
        raise _error(path, reference, written_for, err) from err
    return model, applied_shims(cls) + config_shims


def _error(path: str, reference: str, written_for: str, err: Exception) -> RemoteCodeError:
    import transformers

    detail = " ".join(str(err).split())[:300]
    if isinstance(err, ImportError):
        fix = "install what it names"
    elif isinstance(err, OSError):
        fix = "check the folder or Hub id (and the network for a Hub id)"
    else:
        fix = ("use a copy of the model folder whose modeling file is updated for transformers 5 (--model "
               "<folder>), or report the model to mdlm-ctc")
    return RemoteCodeError(
        f"`model` {path!r}: its own code ({reference}, written for transformers {written_for}) cannot be loaded "
        f"with transformers {transformers.__version__} even with mdlm-ctc's compatibility shims (post_init, "
        f"tie_weights(**kwargs), config.use_cache, rope 'default', rotary inv_freq, "
        f"GenerationConfig.validate(**kwargs)): "
        f"{type(err).__name__}: {detail}. Fix: {fix}; "
        f"MDLM_CTC_TRACEBACK=1 shows the full traceback")
