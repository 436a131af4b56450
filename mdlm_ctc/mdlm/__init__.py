"""The thin MDLM fine-tuning loop of mdlm-ctc (SPEC §7): LLaDA-style SFT with CE and slack-CTC.

Modules, in the order a run uses them:

* ``config``      dataclass configuration; YAML/JSON files and command-line flags; validation.
* ``data``        JSONL ({prompt, response} or chat messages), the embedded synthetic tasks, batch order.
* ``tokenizer``   the embedded WordLevel tokenizer, trained offline with ``tokenizers``.
* ``model``       the embedded tiny bidirectional Llama, Hugging Face loading (LLaDA opt-in), special ids.
* ``objectives``  the objective API every trainer shares: ``make_batch``, ``corrupt`` (the forward
                  process) and ``objective_loss`` (``ce`` / ``ctc`` / ``ce+ctc``; design notes inside).
* ``train``       the loop: accumulation, clipping, schedules, checkpoints, resume, DDP/FSDP2, LoRA.
* ``hf_trainer``  the same objectives in ``transformers.Trainer``: collator, loss, Trainer mixin.
* ``nemo``        the same objectives as a NeMo AutoModel dLLM strategy (``dllm.mode: slack_ctc``).
* ``distributed`` none / DDP / FSDP2 (``fully_shard``), gradient sync, clipping over shards.
* ``checkpoint``  safetensors or ``torch.distributed.checkpoint`` checkpoints, integrity manifests, pruning.
* ``lora``        LoRA through peft, the trainable ``<slack>`` rows, adapter folders, ``merge``.
* ``plan``        the per-GPU memory plan of a job, from the model config alone.
* ``sampler``     LLaDA low-confidence remasking with semi-autoregressive blocks; the shift probe.
* ``evaluate``    metrics, bootstrap intervals (over examples, and over fine-tuning seeds and examples),
                  shift robustness, pairwise win rates, the gap test, detectable differences (power).
* ``report``      Markdown report, PNG plots, the summary table, the paper's claims read from the intervals.
* ``compare``     the main job: a CE base model, then CE and CTC fine-tuning from it on several seeds.
* ``ablation``    the CTC design variants, fine-tuned from the same base, chosen on the validation split.
* ``base``        the base model shipped with the package (``assets/base``) and what identifies a base.
* ``build_base``  ``python -m mdlm_ctc.mdlm.build_base``: builds the shipped base; the base stability check.
* ``prompts``     hand-typed prompts for ``sample``: the embedded tasks' format, unknown words.

Layers (``tests/test_mdlm_layout.py``): the objective API and the model plumbing at the bottom, the
loop and the trainer integrations above them, the comparison study (``report`` <- ``compare`` <-
``ablation``) on top; imports never point up. The loop uses only mdlm-ctc's public loss API
(``slack_ctc_loss``, ``best_alignment`` and, when the package has it, ``linear_slack_ctc_loss``). Heavy
imports (transformers, matplotlib, NeMo) happen inside functions or in the integration modules, so
importing this package is cheap and touches no GPU.
"""

from .config import Config, ObjectiveConfig

__all__ = ["Config", "ObjectiveConfig", "run_compare", "train_run", "prepare", "make_batch", "corrupt",
           "objective_loss", "Corruption"]


def __getattr__(name):
    if name in ("make_batch", "corrupt", "objective_loss", "Corruption"):
        from . import objectives

        return getattr(objectives, name)
    if name == "run_compare":
        from .compare import run_compare

        return run_compare
    if name in ("train_run", "prepare"):
        from . import train

        return getattr(train, name)
    raise AttributeError(name)
