"""The run configuration: dataclasses, YAML/JSON files and command-line flags, in one place.

A configuration is a :class:`Config` made of sections (``run``, ``model``, ``data``, ``objective``,
``train``, ``sample``, ``eval``). Every field has a one-line help text and, where it matters, a list
of allowed values; ``--help`` is generated from them, so it explains every option.

Precedence: the dataclass defaults (which *are* the embedded CPU default), then a ``--config`` file
(YAML or JSON, nested by section or flat), then command-line flags. Field names are unique across
sections, so a flat file and the flags use the same names (``lr: 3e-4`` or ``--lr 3e-4``).

Every bad value raises ``ValueError`` naming the option and the value, before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_args, get_origin, get_type_hints

OBJECTIVES = ("ce", "ctc", "ce+ctc")
EMBEDDED_BASE_STEPS = 3000


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    name: str = _opt("default", "run name; everything is written under <output_dir>/<name>/")
    output_dir: str = _opt("runs", "folder that holds the run folders")
    seed: int = _opt(0, "seed of the model initialisation, data order, masking noise and sampling")
    device: str = _opt("auto", "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    threads: int = _opt(0, "torch intra-op CPU threads; 0 keeps torch's default")
    progress: bool = _opt(True, "show tqdm progress bars")


@dataclass
class ModelConfig:
    model: str = _opt("embedded", "'embedded' (a tiny bidirectional Llama built from the tiny_* options, with "
                      "a tokenizer trained offline on the training data) or a local folder / Hugging Face id")
    tokenizer: Optional[str] = _opt(None, "tokenizer folder or id; default: the model's")
    trust_remote_code: bool = _opt(False, "allow the model's own code (needed for LLaDA); opt-in, never the default")
    tiny_hidden_size: int = _opt(128, "embedded model: hidden size")
    tiny_layers: int = _opt(4, "embedded model: number of transformer layers")
    tiny_heads: int = _opt(4, "embedded model: attention heads")
    tiny_kv_heads: int = _opt(4, "embedded model: key/value heads (grouped-query attention when fewer)")
    tiny_intermediate_size: int = _opt(512, "embedded model: MLP width")
    tokenizer_vocab_size: int = _opt(4096, "embedded tokenizer: maximum vocabulary (WordLevel, whitespace split)")
    mask_token: Optional[str] = _opt(None, "mask token; default: the tokenizer's mask token, else the model "
                                     "config's mask_token_id, else '<|mdm_mask|>' if present")
    eos_token: Optional[str] = _opt(None, "end-of-sequence token used for the answer's EOS (and CE's EOS "
                                    "padding); default: the tokenizer's EOS")
    slack_token: str = _opt("<slack>", "the slack token; added to the tokenizer (embedding row initialised "
                            "to the mean embedding) when the vocabulary lacks it")
    answer_end: str = _opt("auto", "token(s) between the answer and its EOS padding: 'auto' (what the chat template "
                           "ends an assistant turn with, unless EOS: LLaDA-8B-Instruct's <|eot_id|>; nothing "
                           "for the embedded model), 'none', or a token; the sampler's answer stops there too")
    attn_implementation: str = _opt("sdpa", "attention kernel for models built or loaded by transformers",
                                    ("sdpa", "eager"))
    load_dtype: str = _opt("auto", "dtype of the weights: 'auto' (float32 on CPU, the checkpoint's dtype on "
                           "GPU), 'float32' or 'bfloat16'", ("auto", "float32", "bfloat16"))
    precision: str = _opt("auto", "compute precision: 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or "
                          "'bf16' (autocast; CUDA only)", ("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    fused_lm_head: str = _opt("auto", "compute the CTC loss from hidden states + LM head weight without "
                              "materialising logits: 'auto' (on when the vocabulary is >= 32768 and the model "
                              "exposes its LM head), 'on' or 'off'; falls back to logits when this mdlm_ctc "
                              "has no linear_slack_ctc_loss", ("auto", "on", "off"))
    # token ids given directly (LLaDA: mask 126336, EOS 126081, a reserved id such as 126084 for <slack>)
    mask_id: Optional[int] = _opt(None, "mask token id; overrides mask_token (default for LLaDA configs without "
                                  "a mask token: 126336)")
    eos_id: Optional[int] = _opt(None, "EOS id; overrides eos_token (default for LLaDA configs without an EOS "
                                 "token: 126081)")
    slack_id: Optional[int] = _opt(None, "reuse this reserved id of the vocabulary as <slack> instead of adding a "
                                   "token and growing the embedding (LLaDA: e.g. 126084, as VoidPadding does)")


@dataclass
class DataConfig:
    train_file: Optional[str] = _opt(None, "training JSONL: {\"prompt\", \"response\"} or {\"messages\": [...]} "
                                     "per line; default: the embedded synthetic data")
    eval_file: Optional[str] = _opt(None, "evaluation JSONL (same formats); default: embedded synthetic "
                                    "(held out: no prompt seen in training)")
    val_file: Optional[str] = _opt(None, "validation JSONL (same formats) on which `ablate` chooses settings; "
                                   "default: embedded synthetic (held out from training and evaluation)")
    skip_bad: bool = _opt(False, "skip malformed JSONL lines (and count them) instead of stopping with the "
                          "line number")
    wrap_chat: bool = _opt(False, "wrap {prompt, response} pairs in the tokenizer's chat template (as a "
                           "user turn); {messages} rows always use it")
    max_length: int = _opt(36, "total tokens per row: prompt + response canvas (answer, EOS, padding)")
    pad_to: str = _opt("max_length", "'max_length': every row is max_length long (canvas = max_length - "
                       "prompt); 'longest': the longest row of the global batch plus canvas_extra",
                       ("max_length", "longest"))
    canvas_extra: int = _opt(8, "pad_to=longest: canvas positions added beyond the longest answer + EOS")
    too_long: str = _opt("drop", "examples whose prompt + answer + EOS exceed max_length: 'drop' (counted) or "
                         "'error'", ("drop", "error"))
    synthetic_train_size: int = _opt(20000, "embedded data: training examples")
    synthetic_eval_size: int = _opt(1000, "embedded data: evaluation examples")
    synthetic_val_size: int = _opt(1000, "embedded data: validation examples (held out from training and "
                                   "evaluation; `ablate` chooses settings on them)")
    synthetic_tasks: str = _opt("copy,reverse,expand,insert,dedup", "embedded data: comma-separated tasks "
                                "(copy, reverse, expand = numbers with runs of equal digits, insert = insert "
                                "then copy, dedup = variable-length answers)")
    synthetic_min_len: int = _opt(2, "embedded data: shortest answer (tokens)")
    synthetic_max_len: int = _opt(10, "embedded data: longest sequence a task reads or writes (tokens)")
    synthetic_alphabet: int = _opt(16, "embedded data: number of letter symbols (2..26)")


@dataclass
class ObjectiveConfig:
    objective: str = _opt("ctc", "training objective for `train`: 'ce' (LLaDA SFT), 'ctc' (slack-CTC) or "
                          "'ce+ctc' ((1 - ctc_weight) * CE + ctc_weight * CTC)", OBJECTIVES)
    compare_objectives: str = _opt("ce,ctc", "`compare`: comma-separated objectives trained from one "
                                   "initialisation; the first is the baseline of the pairwise comparisons")
    ctc_weight: float = _opt(0.5, "ce+ctc: weight of the CTC term, in [0, 1]")
    mask_eps: float = _opt(1e-3, "masking: t ~ U(0, 1), p = (1 - eps) t + eps per row")
    normalization: str = _opt("sequence", "loss normalisation: 'sequence' (each row / its canvas length, "
                              "then / batch: LLaDA), 'token' (/ canvas positions in the batch) or 'batch' "
                              "(/ rows)", ("sequence", "token", "batch"))
    slack_insertion: str = _opt("none", "CTC clean canvas: 'random' (slack before each target token, "
                                "geometric with slack_rate), 'probe' (with probability slack_rate per row, one "
                                "slack before a random answer token, that position masked: the shift probe's "
                                "canvas), 'best' (the model's Viterbi alignment on the fully masked canvas) or "
                                "'none' (the target, then slack); 'probe_visible' is 'probe' with the displaced token "
                                "always visible (the state the sampler's probe creates)",
                                ("random", "probe", "probe_visible", "best", "none"))
    slack_rate: float = _opt(0.1, "slack_insertion=random: parameter of the geometric number of slack tokens "
                             "before each target token (mean rate / (1 - rate)), in [0, 1); probe: probability "
                             "per row, in [0, 1]")
    ctc_max_shift: Optional[int] = _opt(None, "CTC lattice: at most this many slack tokens before any target "
                                        "token (0 = position-wise); default: unrestricted")
    ctc_canvas: str = _opt("eos", "CTC canvas: 'eos' (LLaDA's canvas: the target is the answer and its EOS "
                           "padding less slack_budget EOS, so every canvas holds exactly that many slack tokens, "
                           "anywhere) or 'slack' (the answer and one EOS, padded with slack)", ("eos", "slack"))
    slack_budget: int = _opt(2, "ctc_canvas=eos: slack tokens per canvas (bound by ctc_max_shift and by the room "
                             "after the answer and one EOS); 0 with ctc_canvas=eos is exactly CE")
    slack_budget_ratio: float = _opt(0.0, "ctc_canvas=eos: extra slack tokens per answer token (ceil(ratio * "
                                     "answer length) added to slack_budget)")


@dataclass
class TrainConfig:
    steps: int = _opt(400, "optimizer steps (the fine-tuning stage of `compare`; its base model uses base_steps)")
    batch_size: int = _opt(32, "global batch (rows per optimizer step, all processes together)")
    micro_batch_size: int = _opt(0, "rows per forward pass per process; 0 = batch_size / processes; "
                                 "gradient accumulation = batch_size / (processes * micro_batch_size)")
    lr: float = _opt(1e-3, "peak learning rate (AdamW; the base model uses base_lr)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.98, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    schedule: str = _opt("cosine", "learning-rate schedule after linear warmup: 'cosine' (to min_lr_ratio), "
                         "'wsd' (warmup-stable-decay, linear decay over the last wsd_decay_fraction) or "
                         "'constant'", ("cosine", "wsd", "constant"))
    warmup_steps: int = _opt(50, "linear warmup steps")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of lr (cosine, wsd)")
    wsd_decay_fraction: float = _opt(0.2, "wsd: fraction of the steps spent decaying")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0 disables")
    log_every: int = _opt(10, "write a metrics line every this many steps")
    checkpoint_every: int = _opt(500, "save a resumable checkpoint every this many steps; 0 = only at the end")
    keep_checkpoints: int = _opt(2, "keep this many most recent checkpoints")
    resume: bool = _opt(False, "resume from the run's latest checkpoint (start fresh if there is none)")
    init_from: Optional[str] = _opt(None, "initial weights: a model folder (save_pretrained layout); "
                                    "default: the model itself (embedded: random init from seed)")
    # scale: distribution, LoRA and the memory plan (mdlm_ctc.mdlm.distributed, .lora, .plan)
    distributed: str = _opt("auto", "data parallelism under torchrun: 'auto' (ddp with several processes), "
                            "'none', 'ddp' (whole model on every process: small models) or 'fsdp' (FSDP2 "
                            "fully_shard per decoder layer and at the root; sharded checkpoints)",
                            ("auto", "none", "ddp", "fsdp"))
    lora: bool = _opt(False, "train LoRA adapters (peft) on a frozen base, plus the <slack> embedding/head row")
    lora_rank: int = _opt(32, "LoRA rank r")
    lora_alpha: float = _opt(64.0, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = _opt(0.05, "LoRA dropout")
    lora_target_modules: str = _opt("all-linear",
                                    "linear layers that get adapters: 'all-linear' (every one but the LM head), or "
                                    "comma-separated full module paths or their trailing names (Llama: q_proj,"
                                    "...,down_proj; LLaDA: q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out); "
                                    "the LM head is never adapted (its <slack> row trains)")
    gpu_memory_gb: float = _opt(80.0, "memory of one GPU (GiB) the plan checks the job against; 0 = do not check")
    world_size: int = _opt(0, "`plan`: processes (GPUs) to plan for; 0 = $WORLD_SIZE, else 1")
    merge_output: Optional[str] = _opt(None, "`merge`: folder for the merged full model; default: "
                                       "<checkpoint>-merged")


@dataclass
class SampleConfig:
    gen_length: int = _opt(24, "sampler: canvas length generated after the prompt")
    sample_steps: int = _opt(24, "sampler: denoising steps in total (divided evenly among blocks)")
    block_length: int = _opt(8, "sampler: semi-autoregressive block length (gen_length must be a multiple)")
    temperature: float = _opt(0.0, "sampler: Gumbel-max temperature; 0 = greedy")
    remasking: str = _opt("low_confidence", "sampler: which predictions to commit each step",
                          ("low_confidence", "random"))
    shift_fraction: float = _opt(0.0, "sampler: probability that each committed content token is displaced "
                                 "by one position (the positional-shift probe); in [0, 1]")
    shift_direction: str = _opt("right", "sampler: direction of a displacement", ("right", "left", "random"))
    sample_batch_size: int = _opt(64, "sampler: rows per forward pass")
    sample_slack_budget: int = _opt(-1, "sampler: at most this many <slack> tokens committed per canvas (then slack "
                                    "is no longer a candidate); -1 = no limit")
    eos_fill: bool = _opt(False, "sampler: once an EOS is committed, commit EOS at every later masked position (the "
                          "tail of LLaDA's canvas)")


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = _opt(None, "`eval`/`sample`: model folder to load (e.g. runs/default/ft/ctc/seed1/final)")
    baseline: Optional[str] = _opt(None, "`eval`: a second model folder; pairwise win rates are reported "
                                   "against it")
    max_eval_examples: int = _opt(0, "evaluate at most this many examples; 0 = all")
    shift_fractions: str = _opt("0,0.01,0.05", "shift-robustness curve: comma-separated shift fractions (the "
                                "paper probes 1%; the goal is read at 5%)")
    gap_test: bool = _opt(True, "`compare`/`ablate`: also run the gap test (one displacement per example; the "
                          "model's probability of <slack>, of a duplicate and of anything else at the gap)")
    bootstrap_samples: int = _opt(1000, "bootstrap resamples for the confidence intervals")
    confidence: float = _opt(0.95, "confidence level of the intervals")
    prompt: Optional[str] = _opt(None, "`sample`: the prompt text, written like the training prompts (embedded "
                                 "model: a task and its input, e.g. 'copy : a c b' or 'insert x 1 : a c b'); default: "
                                 "the first num_samples eval prompts")
    num_samples: int = _opt(4, "`sample`: prompts to sample when --prompt is not given")
    show_canvas: bool = _opt(False, "`sample`: also print the raw canvas (slack, EOS)")


@dataclass
class CompareConfig:
    base_steps: int = _opt(-1, "`compare`/`ablate`: CE pre-training steps of the base model that every fine-tune "
                           "starts from (built once in <run>/base and reused while its settings are unchanged); "
                           "0 fine-tunes the model as loaded; -1 = 3000 for the embedded model, 0 for a loaded one")
    base_lr: float = _opt(1e-3, "peak learning rate of the base model's CE pre-training")
    base_warmup_steps: int = _opt(100, "warmup steps of the base model's CE pre-training")
    finetune_seeds: str = _opt("1,2,3", "`compare`/`ablate`: seeds of the fine-tuning stage (data order, masking "
                               "noise); every objective is fine-tuned once per seed from the same base")
    control: bool = _opt(True, "`compare`: also fine-tune the CTC control with ctc_max_shift=0 (equal to CE by "
                         "construction on the eos canvas) on the first seed")
    variants: str = _opt("search", "`ablate`: comma-separated variant names, 'search' (the design search on the "
                         "shipped base) or 'all' (the list is in mdlm_ctc/mdlm/ablation.py)")
    base_source: str = _opt("auto", "`compare`/`ablate`: 'auto' (the base shipped with the package when this job's "
                            "base settings are its settings, as with the defaults; else trained in the run folder), "
                            "'shipped' (require it) or 'train' (always train it here)", ("auto", "shipped", "train"))


SECTIONS = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
    "compare": CompareConfig,
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    # ---------------------------------------------------------------- conversion
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, base: "Config | None" = None, check_files: bool = True) -> "Config":
        """Nested ({section: {field: value}}) or flat ({field: value}) dict -> Config (then validated;
        ``check_files=False`` leaves the data files unchecked: a memory plan reads none)."""
        cfg = copy_config(base) if base is not None else cls()
        if not isinstance(data, dict):
            raise ValueError(f"a configuration must be a mapping; got {type(data).__name__}")
        for key, value in data.items():
            if key in SECTIONS and (isinstance(value, dict) or key not in _FIELD_SECTION):
                if not isinstance(value, dict):
                    raise ValueError(f"config section `{key}` must be a mapping; got {value!r}")
                section = getattr(cfg, key)
                for name, v in value.items():
                    if name not in _FIELD_TYPES[key]:
                        raise ValueError(f"unknown option `{key}.{name}`{_suggest(name, _FIELD_TYPES[key])}")
                    setattr(section, name, _coerce(name, v, _FIELD_TYPES[key][name]))
            elif key in _FIELD_SECTION:
                sec = _FIELD_SECTION[key]
                setattr(getattr(cfg, sec), key, _coerce(key, value, _FIELD_TYPES[sec][key]))
            else:
                raise ValueError(f"unknown option `{key}`{_suggest(key, list(_FIELD_SECTION) + list(SECTIONS))}")
        cfg.validate(check_files)
        return cfg

    def validate(self, check_files: bool = True) -> "Config":
        validate(self, check_files)
        return self

    # --------------------------------------------------------------- derived values
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)

    def shift_fraction_list(self) -> list[float]:
        return _float_list(self.eval.shift_fractions, "shift_fractions")

    def compare_objective_list(self) -> list[str]:
        return [s.strip() for s in self.objective.compare_objectives.split(",") if s.strip()]

    def base_step_count(self) -> int:
        """``base_steps`` with -1 resolved: a random embedded model needs a base, a loaded model is one."""
        if self.compare.base_steps >= 0:
            return self.compare.base_steps
        return EMBEDDED_BASE_STEPS if self.model.model == "embedded" and self.train.init_from is None else 0

    def finetune_seed_list(self) -> list[int]:
        return _int_list(self.compare.finetune_seeds, "finetune_seeds")

    def synthetic_task_list(self) -> list[str]:
        return [s.strip() for s in self.data.synthetic_tasks.split(",") if s.strip()]


def copy_config(cfg: Config) -> Config:
    return Config(**{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS})


def load_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or JSON file into a dict."""
    if not os.path.exists(path):
        raise ValueError(f"`config` file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"`config` file {path!r} is not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"`config` file {path!r} is not valid JSON (use .yaml/.yml for YAML): {err}") from None
    return data or {}


def save_config(cfg: Config, path: str) -> None:
    """Write the config as YAML (readable back with --config)."""
    import yaml

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ types and coercion
_FIELD_TYPES: dict[str, dict[str, Any]] = {}
_FIELD_SECTION: dict[str, str] = {}
_FIELD_META: dict[str, dict] = {}
for _sec, _cls in SECTIONS.items():
    _hints = get_type_hints(_cls)
    _FIELD_TYPES[_sec] = {}
    for _f in fields(_cls):
        assert _f.name not in _FIELD_SECTION, f"field name {_f.name} must be unique across sections"
        _FIELD_TYPES[_sec][_f.name] = _hints[_f.name]
        _FIELD_SECTION[_f.name] = _sec
        _FIELD_META[_f.name] = dict(_f.metadata)


def _base_type(tp):
    """(python type, optional?) of a field annotation."""
    if get_origin(tp) is not None and type(None) in get_args(tp):
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        return inner, True
    return tp, False


def _coerce(name: str, value, tp):
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"`{name}` must not be empty; got {value!r}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        pass
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[base]
    raise ValueError(f"`{name}` must be {kind}{' or none' if optional else ''}; got {value!r}")


def _suggest(name, candidates):
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _float_list(text: str, name: str) -> list[float]:
    try:
        values = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"`{name}` must be comma-separated numbers; got {text!r}") from None
    if not values:
        raise ValueError(f"`{name}` must list at least one number; got {text!r}")
    return values


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"`{name}` must be comma-separated integers; got {text!r}") from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise ValueError(f"`{name}` must list distinct integers >= 0; got {text!r}")
    return values


# ------------------------------------------------------------------------------ validation
def _need(ok: bool, name: str, value, requirement: str):
    if not ok:
        raise ValueError(f"`{name}` must be {requirement}; got {value!r}")


def _folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be (or become) a folder: the first of it and its parents that is not a folder."""
    here = os.path.abspath(path)
    while True:
        if os.path.exists(here):
            return None if os.path.isdir(here) else f"{here!r} is a file, not a folder"
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def validate(cfg: Config, check_files: bool = True) -> None:
    for sec in SECTIONS:
        section = getattr(cfg, sec)
        for f in fields(section):
            value = getattr(section, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"`{f.name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    r, m, d, o, t, s, e = cfg.run, cfg.model, cfg.data, cfg.objective, cfg.train, cfg.sample, cfg.eval
    _need(bool(r.name) and "/" not in r.name and r.name not in (".", ".."), "name", r.name,
          "a non-empty folder name without '/'")
    problem = _folder_problem(r.output_dir)
    _need(problem is None, "output_dir", r.output_dir, f"a folder ({problem})")
    problem = _folder_problem(cfg.run_dir())
    _need(problem is None, "name", r.name, f"a folder name under output_dir ({problem})")
    _need(r.seed >= 0, "seed", r.seed, ">= 0")
    _need(r.threads >= 0, "threads", r.threads, ">= 0")
    _need(r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:"), "device", r.device,
          "'auto', 'cpu', 'cuda' or 'cuda:N'")
    for name in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_kv_heads", "tiny_intermediate_size"):
        _need(getattr(m, name) >= 1, name, getattr(m, name), ">= 1")
    _need(m.tiny_hidden_size % m.tiny_heads == 0, "tiny_hidden_size", m.tiny_hidden_size,
          f"a multiple of tiny_heads ({m.tiny_heads})")
    _need(m.tiny_heads % m.tiny_kv_heads == 0, "tiny_kv_heads", m.tiny_kv_heads,
          f"a divisor of tiny_heads ({m.tiny_heads})")
    _need((m.tiny_hidden_size // m.tiny_heads) % 2 == 0, "tiny_hidden_size", m.tiny_hidden_size,
          "such that the head dimension (tiny_hidden_size / tiny_heads) is even (rotary embeddings)")
    _need(m.tokenizer_vocab_size >= 16, "tokenizer_vocab_size", m.tokenizer_vocab_size, ">= 16")
    _need(bool(m.slack_token), "slack_token", m.slack_token, "a non-empty token string")
    _need(bool(m.answer_end), "answer_end", m.answer_end, "'auto', 'none' or a token")
    _need(bool(m.model), "model", m.model, "'embedded' or a model folder / id")
    for name in ("mask_id", "eos_id", "slack_id"):
        _need(getattr(m, name) is None or getattr(m, name) >= 0, name, getattr(m, name), ">= 0 or none")
    _need(d.max_length >= 4, "max_length", d.max_length, ">= 4")
    _need(d.canvas_extra >= 0, "canvas_extra", d.canvas_extra, ">= 0")
    _need(d.synthetic_train_size >= 1, "synthetic_train_size", d.synthetic_train_size, ">= 1")
    _need(d.synthetic_eval_size >= 1, "synthetic_eval_size", d.synthetic_eval_size, ">= 1")
    _need(1 <= d.synthetic_min_len <= d.synthetic_max_len, "synthetic_min_len", d.synthetic_min_len,
          f"between 1 and synthetic_max_len ({d.synthetic_max_len})")
    _need(2 <= d.synthetic_alphabet <= 26, "synthetic_alphabet", d.synthetic_alphabet, "between 2 and 26")
    from .data import SYNTHETIC_TASKS

    tasks = cfg.synthetic_task_list()
    _need(bool(tasks) and all(x in SYNTHETIC_TASKS for x in tasks), "synthetic_tasks", d.synthetic_tasks,
          f"a comma-separated subset of {', '.join(SYNTHETIC_TASKS)}")
    for path_name in ("train_file", "eval_file", "val_file") if check_files else ():
        path = getattr(d, path_name)
        _need(path is None or os.path.isfile(path), path_name, path, "an existing file")
    validate_objective(o)
    _need(t.steps >= 1, "steps", t.steps, ">= 1")
    _need(t.batch_size >= 1, "batch_size", t.batch_size, ">= 1")
    _need(t.micro_batch_size >= 0, "micro_batch_size", t.micro_batch_size, ">= 0")
    _need(t.lr > 0, "lr", t.lr, "> 0")
    _need(t.weight_decay >= 0, "weight_decay", t.weight_decay, ">= 0")
    _need(0 <= t.adam_beta1 < 1, "adam_beta1", t.adam_beta1, "in [0, 1)")
    _need(0 <= t.adam_beta2 < 1, "adam_beta2", t.adam_beta2, "in [0, 1)")
    _need(t.adam_eps > 0, "adam_eps", t.adam_eps, "> 0")
    _need(t.warmup_steps >= 0, "warmup_steps", t.warmup_steps, ">= 0")
    _need(0 <= t.min_lr_ratio <= 1, "min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
    _need(0 < t.wsd_decay_fraction <= 1, "wsd_decay_fraction", t.wsd_decay_fraction, "in (0, 1]")
    _need(t.grad_clip >= 0, "grad_clip", t.grad_clip, ">= 0")
    _need(t.log_every >= 1, "log_every", t.log_every, ">= 1")
    _need(t.checkpoint_every >= 0, "checkpoint_every", t.checkpoint_every, ">= 0")
    _need(t.keep_checkpoints >= 1, "keep_checkpoints", t.keep_checkpoints, ">= 1")
    _need(t.lora_rank >= 1, "lora_rank", t.lora_rank, ">= 1")
    _need(t.lora_alpha > 0, "lora_alpha", t.lora_alpha, "> 0")
    _need(0.0 <= t.lora_dropout < 1.0, "lora_dropout", t.lora_dropout, "in [0, 1)")
    _need(bool(t.lora_target_modules.strip(",").strip()), "lora_target_modules", t.lora_target_modules,
          "a comma-separated list of module names or 'all-linear'")
    _need(t.gpu_memory_gb >= 0, "gpu_memory_gb", t.gpu_memory_gb, ">= 0")
    _need(t.world_size >= 0, "world_size", t.world_size, ">= 0")
    _need(s.gen_length >= 1, "gen_length", s.gen_length, ">= 1")
    _need(s.block_length >= 1 and s.gen_length % s.block_length == 0, "block_length", s.block_length,
          f"a divisor of gen_length ({s.gen_length})")
    blocks = s.gen_length // s.block_length
    _need(s.sample_steps >= blocks and s.sample_steps % blocks == 0, "sample_steps", s.sample_steps,
          f"a positive multiple of the number of blocks (gen_length / block_length = {blocks})")
    _need(s.temperature >= 0, "temperature", s.temperature, ">= 0")
    _need(0.0 <= s.shift_fraction <= 1.0, "shift_fraction", s.shift_fraction, "in [0, 1]")
    _need(s.sample_batch_size >= 1, "sample_batch_size", s.sample_batch_size, ">= 1")
    _need(s.sample_slack_budget >= -1, "sample_slack_budget", s.sample_slack_budget, ">= -1")
    _need(e.max_eval_examples >= 0, "max_eval_examples", e.max_eval_examples, ">= 0")
    fractions = cfg.shift_fraction_list()
    _need(all(0.0 <= x <= 1.0 for x in fractions), "shift_fractions", e.shift_fractions, "numbers in [0, 1]")
    _need(e.bootstrap_samples >= 10, "bootstrap_samples", e.bootstrap_samples, ">= 10")
    _need(0.5 <= e.confidence < 1.0, "confidence", e.confidence, "in [0.5, 1)")
    _need(e.num_samples >= 1, "num_samples", e.num_samples, ">= 1")
    c = cfg.compare
    _need(c.base_steps >= -1, "base_steps", c.base_steps, ">= 0, or -1 (automatic)")
    _need(c.base_lr > 0, "base_lr", c.base_lr, "> 0")
    _need(c.base_warmup_steps >= 0, "base_warmup_steps", c.base_warmup_steps, ">= 0")
    cfg.finetune_seed_list()
    _need(d.synthetic_val_size >= 1, "synthetic_val_size", d.synthetic_val_size, ">= 1")


def validate_objective(o: ObjectiveConfig) -> ObjectiveConfig:
    """Check the ``objective`` section alone (also what the trainer integrations call on an
    ``ObjectiveConfig`` built in Python): types, choices and ranges; returns it unchanged."""
    if not isinstance(o, ObjectiveConfig):
        raise TypeError(f"`objective` must be an ObjectiveConfig; got {type(o).__name__}")
    for f in fields(o):
        value = getattr(o, f.name)
        tp, optional = _base_type(_FIELD_TYPES["objective"][f.name])
        if isinstance(value, bool):
            ok = tp is bool
        else:
            ok = value is None and optional or isinstance(value, tp) or tp is float and isinstance(value, int)
        if not ok:
            raise TypeError(f"`{f.name}` must be {tp.__name__}{' or None' if optional else ''}; got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"`{f.name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    objs = [s.strip() for s in o.compare_objectives.split(",") if s.strip()]
    _need(len(objs) >= 1 and all(x in OBJECTIVES for x in objs) and len(set(objs)) == len(objs),
          "compare_objectives", o.compare_objectives, f"distinct comma-separated objectives among {OBJECTIVES}")
    _need(0.0 <= o.ctc_weight <= 1.0, "ctc_weight", o.ctc_weight, "in [0, 1]")
    _need(0.0 <= o.mask_eps < 1.0, "mask_eps", o.mask_eps, "in [0, 1)")
    if o.slack_insertion in ("probe", "probe_visible"):
        _need(0.0 <= o.slack_rate <= 1.0, "slack_rate", o.slack_rate, "in [0, 1] (probe: a probability per row)")
    else:
        _need(0.0 <= o.slack_rate < 1.0, "slack_rate", o.slack_rate, "in [0, 1)")
    _need(o.ctc_max_shift is None or o.ctc_max_shift >= 0, "ctc_max_shift", o.ctc_max_shift, ">= 0 or None")
    _need(o.slack_budget >= 0, "slack_budget", o.slack_budget, ">= 0")
    _need(o.slack_budget_ratio >= 0, "slack_budget_ratio", o.slack_budget_ratio, ">= 0")
    return o


# ------------------------------------------------------------------------------ command-line flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, sections=tuple(SECTIONS), exclude=()) -> None:
    """One flag per field of the given sections (minus ``exclude``), grouped by section; defaults shown."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML (.yaml/.yml) or JSON file of options (nested by section or flat); "
                             "flags given on the command line override it")
    defaults = Config()
    for sec in sections:
        group = parser.add_argument_group(f"{sec} options")
        for f in fields(SECTIONS[sec]):
            if f.name in exclude:
                continue
            tp, optional = _base_type(_FIELD_TYPES[sec][f.name])
            default = getattr(getattr(defaults, sec), f.name)
            choices = f.metadata.get("choices")
            help_text = f.metadata["help"]
            if choices:
                help_text += f" {{{', '.join(choices)}}}"
            help_text = (help_text + f" (default: {default!r})").replace("%", "%%")
            if tp is bool:
                group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                metavar = {int: "INT", float: "FLOAT", str: "STR"}[tp]
                if optional:
                    metavar += "|none"
                group.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                                   help=help_text)


def config_from_args(args: argparse.Namespace, check_files: bool = True) -> Config:
    """Defaults <- --config file <- flags; validated (the data files only with ``check_files``)."""
    given = vars(args)
    base = Config()
    if "config" in given:
        base = Config.from_dict(load_config_file(given["config"]), base, check_files)
    flags = {k: v for k, v in given.items() if k in _FIELD_SECTION}
    return Config.from_dict(flags, base, check_files)
