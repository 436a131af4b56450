"""The ``mdlm-ctc`` command line (also ``python -m mdlm_ctc``).

    mdlm-ctc compare                      # the main job: CE base, then CE vs CTC fine-tuning, report in runs/default/
    mdlm-ctc ablate                       # the CTC design variants on the validation split (same base)
    mdlm-ctc compare --config job.yaml    # the same job on a real model and data
    mdlm-ctc train --objective ctc        # one training run (torchrun-able for DDP)
    mdlm-ctc eval --checkpoint runs/default/ft/ctc/seed1/final --baseline runs/default/ft/ce/seed1/final
    mdlm-ctc sample --checkpoint runs/default/ft/ctc/seed1/final --prompt "copy : a b c"
    mdlm-ctc plan --config job.yaml       # per-GPU memory of a job (ddp / fsdp / lora), before anything loads
    mdlm-ctc merge --checkpoint runs/lora/final   # a LoRA adapter folded into a full model

Every option is a field of :class:`mdlm_ctc.mdlm.config.Config`; ``mdlm-ctc COMMAND --help`` lists the
options of a command with their meaning and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .mdlm.config import SECTIONS, TrainConfig, add_config_arguments, config_from_args

_DESCRIPTION = """\
Fine-tune masked diffusion LMs with the slack-CTC loss of mdlm-ctc against the matched LLaDA
cross-entropy baseline, sample them, and measure what changes (exact match, edit distance,
robustness to positional shifts). Start with `mdlm-ctc compare`: with no options it takes the tiny CE
base model shipped with the package (trained on the embedded synthetic data), fine-tunes it with CE
and with slack-CTC on three seeds, evaluates every model on 1,000 held-out examples under the paper's
shift probe and the gap test (CPU, about a quarter of an hour on 2 quiet cores) and writes
runs/default/report.md. The command runs with OMP_WAIT_POLICY=PASSIVE unless the variable is set."""

_LOOP_DEPENDENCIES = ("transformers", "tokenizers", "safetensors", "yaml", "tqdm", "matplotlib")

_COMMANDS = {
    "compare": dict(
        help="the main job: train every objective of --compare-objectives from one initialisation, "
             "evaluate, write the report",
        description="Train CE and CTC (or --compare-objectives) from the same initial weights, with the same "
                    "data, noise, steps and hyper-parameters; evaluate all at every shift fraction; write "
                    "<output_dir>/<name>/report.md, PNG plots, summary.json and print a summary table. With no "
                    "options: the embedded CPU default.",
        exclude={"objective", "checkpoint", "baseline", "prompt", "num_samples", "show_canvas", "shift_fraction",
                 "merge_output"}),
    "ablate": dict(
        help="fine-tune every CTC design variant from the comparison's base; evaluate on the validation split",
        description="Fine-tune the variants of mdlm_ctc/mdlm/ablation.py (--variants) from the base model of the run "
                    "folder (built if missing), once per --finetune-seeds, evaluate them on the validation split "
                    "(never the evaluation set) and write <output_dir>/<name>/ablation/ablation.md; `compare` then "
                    "includes the table in its report.",
        exclude={"objective", "checkpoint", "baseline", "prompt", "num_samples", "show_canvas", "shift_fraction",
                 "compare_objectives", "control", "merge_output"}),
    "train": dict(
        help="train one model (--objective); DDP with `torchrun --nproc_per_node=N -m mdlm_ctc train ...`",
        description="Train one model with --objective into <output_dir>/<name>/ (metrics.jsonl, checkpoints/, "
                    "final/). Under torchrun it trains with DDP (gloo on CPU, NCCL on GPU) or, with --distributed fsdp, "
                    "FSDP2; --lora trains peft LoRA adapters. The memory plan is printed first.",
        exclude={"compare_objectives", "checkpoint", "baseline", "prompt", "num_samples", "show_canvas",
                 "max_eval_examples", "shift_fractions", "bootstrap_samples", "confidence", "merge_output"},
        sections=("run", "model", "data", "objective", "train")),
    "eval": dict(
        help="evaluate a model folder (and compare it with --baseline) at every shift fraction",
        description="Sample the evaluation set with --checkpoint (and --baseline) at every shift fraction and "
                    "report exact match, edit distance, length error, slack rate and, with a baseline, "
                    "pairwise win rates with bootstrap intervals. Results go to <output_dir>/<name>/eval/.",
        exclude={"prompt", "num_samples", "show_canvas", "shift_fraction"},
        sections=("run", "model", "data", "sample", "eval")),
    "sample": dict(
        help="sample from a model folder (--prompt, or the first --num-samples evaluation prompts)",
        description="Generate with LLaDA's low-confidence remasking sampler; prints the decoded answer "
                    "(slack deleted, cut at EOS) and, with --show-canvas, the raw canvas. A --prompt is written "
                    "like the training prompts: for the embedded model a task and its input, symbols separated by "
                    "spaces (copy : a c b, reverse : a c b, expand : 1 0 *3 5, insert x 1 : a c b, dedup : a a c); "
                    "the fixed-width field of _ it was trained on is added, and a word it never saw is an error. "
                    "Without --prompt it samples the first --num-samples evaluation prompts.",
        exclude={"baseline", "max_eval_examples", "shift_fractions", "bootstrap_samples", "confidence"},
        sections=("run", "model", "data", "sample", "eval")),
    "plan": dict(
        help="estimate per-GPU memory of a training job (ddp / fsdp / lora) from the model config alone",
        description="Print the memory plan of `train` with these options: weights, gradients, optimizer "
                    "state, activations (with and without gradient checkpointing) and logits or the fused head, "
                    "per GPU, for ddp, fsdp and lora at --world-size. Reads only the model's config.json. Exits "
                    "with status 3 when the chosen setting does not fit --gpu-memory-gb.",
        exclude={"compare_objectives", "checkpoint", "baseline", "prompt", "num_samples", "show_canvas",
                 "max_eval_examples", "shift_fractions", "bootstrap_samples", "confidence", "merge_output"},
        sections=("run", "model", "data", "objective", "train")),
    "merge": dict(
        help="fold a LoRA adapter folder (final/ of a --lora run) into a full model folder",
        description="Load the adapter's base model, apply the adapter, merge it (peft merge_and_unload) and write "
                    "a full save_pretrained folder (--merge-output, default <checkpoint>-merged) that eval, "
                    "sample and Hugging Face load.",
        exclude={f.name for f in dataclasses.fields(TrainConfig)} - {"merge_output"}
        | {"baseline", "max_eval_examples", "shift_fractions", "bootstrap_samples", "confidence", "prompt",
           "num_samples", "show_canvas"},
        sections=("run", "model", "train", "eval")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdlm-ctc", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in _COMMANDS.items():
        sp = sub.add_parser(name, help=spec["help"], description=spec["description"])
        add_config_arguments(sp, spec.get("sections", tuple(SECTIONS)), exclude=spec.get("exclude", set()))
    return parser


def _cmd_compare(cfg) -> int:
    from .mdlm.compare import run_compare

    run_compare(cfg)
    return 0


def _cmd_ablate(cfg) -> int:
    from .mdlm.ablation import run_ablation

    run_ablation(cfg)
    return 0


def _cmd_train(cfg) -> int:
    from .mdlm.plan import plan_job
    from .mdlm.train import _barrier, init_distributed, prepare, train_run

    dist_info = init_distributed(cfg.run.device)
    root = cfg.run_dir()
    log = print if dist_info.main else (lambda *a, **k: None)
    from .mdlm.model import resolve_device

    plan = plan_job(cfg, world=dist_info.world, root=root,  # from the config alone, before anything loads
                    gpu=resolve_device(cfg.run.device).type == "cuda")
    log(plan.render())
    if plan.fits is False:
        raise ValueError(plan.refusal())
    if dist_info.main:
        prepared = prepare(cfg, root, log=log)
    _barrier(dist_info)
    if not dist_info.main:
        prepared = prepare(cfg, root, log=log, is_main=False)
    summary = train_run(cfg, prepared, root, objective=cfg.objective.objective, log=log)
    if dist_info.main:
        final = summary.get("final", {})
        print(f"trained {summary['objective']} for {summary['steps']} steps; final loss "
              f"{final.get('loss', float('nan')):.4f}; model in {os.path.join(root, 'final')}")
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _cmd_eval(cfg) -> int:
    from .mdlm.compare import evaluate_runs
    from .mdlm.data import load_datasets
    from .mdlm.model import read_meta
    from .mdlm.report import summary_table

    if cfg.eval.checkpoint is None:
        raise ValueError("`checkpoint` is required for eval (a model folder, e.g. runs/default/ft/ctc/seed1/final)")
    _, examples, _ = load_datasets(cfg, need_train=False)
    if cfg.eval.max_eval_examples:
        examples = examples[: cfg.eval.max_eval_examples]
    dirs = {}
    for path in ([cfg.eval.baseline] if cfg.eval.baseline else []) + [cfg.eval.checkpoint]:
        label = str(read_meta(path).get("objective", os.path.basename(os.path.dirname(os.path.abspath(path)))))
        while label in dirs:
            label += "'"
        dirs[label] = path
    root = cfg.run_dir()
    results, comparison = evaluate_runs(cfg, dirs, examples, root)
    print(summary_table(results, comparison if cfg.eval.baseline else None, cfg.shift_fraction_list()))
    print(f"per-example outputs in {os.path.join(root, 'eval')}/")
    return 0


def _cmd_sample(cfg) -> int:
    import torch

    from .mdlm.data import Example, _prompt_ids, load_datasets
    from .mdlm.evaluate import sample_seed
    from .mdlm.model import DiffusionLM, load_model_dir, resolve_device
    from .mdlm.sampler import generate

    if cfg.eval.checkpoint is None:
        raise ValueError("`checkpoint` is required for sample (a model folder, e.g. runs/default/ft/ctc/seed1/final)")
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    hf, tokenizer, special = load_model_dir(cfg.eval.checkpoint, cfg, device)
    if cfg.eval.prompt is not None:
        examples = [Example(prompt=_hand_prompt(cfg, tokenizer), response="")]
    else:
        _, examples, _ = load_datasets(cfg, need_train=False)
        examples = examples[: cfg.eval.num_samples]
    prompts = [_prompt_ids(tokenizer, ex, cfg.data.wrap_chat) for ex in examples]
    seeds = [sample_seed(cfg.run.seed, i) for i in range(len(prompts))]
    results = generate(DiffusionLM(hf).to(device), prompts, seeds, special, cfg.sample,
                       shift_fraction=cfg.sample.shift_fraction, device=device)
    for ex, res in zip(examples, results):
        prompt_text = ex.prompt if ex.prompt is not None else ex.messages[-2]["content"]
        print(f"prompt:    {prompt_text}")
        print(f"answer:    {tokenizer.decode(res.tokens)}")
        if ex.response:
            print(f"reference: {ex.response}")
        if cfg.eval.show_canvas:
            names = {special.slack_id: "<slack>", special.eos_id: "<eos>", special.mask_id: "<mask>"}
            tokens = [tok if tok is not None else names.get(i, f"<id {i}>")  # a reserved id has no string
                      for i, tok in zip(res.canvas, tokenizer.convert_ids_to_tokens(res.canvas))]
            print(f"canvas:    {' '.join(tokens)}")
        if cfg.sample.shift_fraction > 0:
            print(f"shifted:   {res.displaced} of {res.content_committed} content tokens displaced")
        print()
    return 0


def _hand_prompt(cfg, tokenizer) -> str:
    """``--prompt`` as the model was trained to read it; a clear error for a word the tokenizer does not know."""
    from .mdlm.data import FILLER
    from .mdlm.model import read_meta
    from .mdlm.prompts import prompt_help, synthetic_prompt, unknown_words

    prompt = cfg.eval.prompt
    width = read_meta(cfg.eval.checkpoint).get("synthetic_max_len", cfg.data.synthetic_max_len)  # as trained
    if cfg.data.train_file is None and FILLER in tokenizer.get_vocab():  # the embedded tasks: their fixed-width field
        written = synthetic_prompt(prompt, width)
        if written != prompt:
            print(f"note: prompt written in the training format: {written}")
        prompt = written
    unknown = unknown_words(prompt, tokenizer)
    if unknown:
        known = sorted(w for w in tokenizer.get_vocab() if not (w.startswith("<") and w.endswith(">")))
        hint = prompt_help(width) if cfg.data.train_file is None else \
            "write it with the words of the training data"
        raise ValueError(f"`prompt` has words the model's tokenizer does not know: {', '.join(unknown)}; {hint}"
                         + (f". Known words: {' '.join(known)}" if len(known) <= 80 else ""))
    return prompt


def _cmd_plan(cfg) -> int:
    from .mdlm.plan import plan_job

    plan = plan_job(cfg)
    print(plan.render())
    return 0 if plan.fits is not False else 3


def _cmd_merge(cfg) -> int:
    from .mdlm.lora import merge_to_full_model

    if cfg.eval.checkpoint is None:
        raise ValueError("`checkpoint` is required for merge (a LoRA adapter folder, e.g. runs/default/final)")
    out = cfg.train.merge_output or cfg.eval.checkpoint.rstrip("/") + "-merged"
    merge_to_full_model(cfg.eval.checkpoint, out, cfg)
    print(f"merged {cfg.eval.checkpoint} into a full model: {out}")
    return 0


def _passive_openmp(argv) -> None:
    """Run this command again with ``OMP_WAIT_POLICY=PASSIVE`` when the variable is unset.

    torch's OpenMP threads spin while they wait for work; when more threads want the cores than there
    are (other jobs on the machine), the spinning threads take the time the working ones need, and
    every training step of the embedded model became ~30x slower (3-6 s against ~0.1 s). A passive
    wait policy lets idle threads sleep. It changes how threads wait, not what they compute, so results
    do not change. OpenMP reads the variable when torch loads it, before this function can run, hence
    the new process. Set ``OMP_WAIT_POLICY`` yourself (e.g. ACTIVE) to keep your own policy; a command
    called in-process (``main([...])``), ``--help`` and a single thread are left alone.
    """
    if argv is not None or "OMP_WAIT_POLICY" in os.environ or any(a in ("-h", "--help") for a in sys.argv[1:]):
        return
    import torch

    if torch.get_num_threads() <= 1 or len(sys.argv) < 2:
        return
    script = sys.argv[0]
    if script.endswith("__main__.py"):  # python -m mdlm_ctc
        command = [sys.executable, "-m", "mdlm_ctc", *sys.argv[1:]]
    elif os.path.isfile(script):        # the mdlm-ctc console script
        command = [sys.executable, script, *sys.argv[1:]]
    else:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def main(argv=None) -> int:
    _passive_openmp(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        cfg = config_from_args(args, check_files=args.command != "plan")  # a plan reads no data
        return {"compare": _cmd_compare, "ablate": _cmd_ablate, "train": _cmd_train, "eval": _cmd_eval,
                "sample": _cmd_sample, "plan": _cmd_plan, "merge": _cmd_merge}[args.command](cfg)
    except ImportError as err:
        if err.name not in _LOOP_DEPENDENCIES:
            raise
        print(f"mdlm-ctc {args.command}: error: the fine-tuning loop needs {err.name!r}, which is not installed; "
              f"install the loop's dependencies with: pip install 'mdlm-ctc[mdlm]'", file=sys.stderr)
        return 2
    except (ValueError, NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError) as err:
        # bad options, malformed data, a path that cannot be written: a clear message, no traceback
        if os.environ.get("MDLM_CTC_TRACEBACK"):
            raise
        print(f"mdlm-ctc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
