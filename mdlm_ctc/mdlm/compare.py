"""The main job: train CE and CTC from one initialisation, evaluate both, write the report.

``mdlm-ctc compare`` (no arguments) runs the embedded default on CPU:

1. data: the embedded synthetic training set and a held-out evaluation set (``<run>/data/``);
2. tokenizer: trained offline on the training data (``<run>/tokenizer/``);
3. initial weights: one random tiny bidirectional Llama (``<run>/init/``);
4. one training run per objective of ``compare_objectives`` (``<run>/<objective>/``), all from those
   weights with the same data order, masking noise, steps and hyper-parameters;
5. evaluation of every final model at every shift fraction (``<run>/eval/``);
6. ``report.md``, ``loss_curves.png``, ``shift_robustness.png``, ``per_task.png``, ``summary.json``, and
   the summary table on stdout.

With ``--config job.yaml`` (a real model and JSONL files) the same steps run a real job. With
``--resume`` a killed comparison continues: finished runs are skipped and an interrupted one resumes
from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import torch

from .config import Config, copy_config, save_config
from .evaluate import compare_results, evaluate_model
from .model import DiffusionLM, load_model_dir, resolve_device
from .report import summary_table, write_report
from .train import init_distributed, prepare, read_metrics, train_run


def _write_records(path: str, result: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for rho, block in result["fractions"].items():
            for rec in block["records"]:
                f.write(json.dumps({"shift_fraction": rho, **rec}) + "\n")
    os.replace(tmp, path)


def _strip_records(result: dict) -> dict:
    return {"label": result["label"],
            "fractions": {str(k): v["summary"] for k, v in result["fractions"].items()}}


def evaluate_runs(cfg: Config, model_dirs: dict[str, str], examples, root: str, log=print) -> tuple[dict, dict]:
    """Evaluate every model folder; returns (results, pairwise comparison)."""
    device = resolve_device(cfg.run.device)
    results = {}
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    for name, path in model_dirs.items():
        hf, tokenizer, special = load_model_dir(path, cfg, device)
        model = DiffusionLM(hf).to(device)
        results[name] = evaluate_model(model, tokenizer, special, examples, cfg, device=device,
                                       progress=cfg.run.progress, label=name)
        _write_records(os.path.join(root, "eval", f"{name.replace('+', '_')}.jsonl"), results[name])
        s0 = results[name]["fractions"][cfg.shift_fraction_list()[0]]["summary"]["exact"]
        log(f"[{name}] exact match {s0['mean']:.3f} [{s0['lo']:.3f}, {s0['hi']:.3f}] without shift")
        del model, hf
    return results, compare_results(results, cfg)


def run_compare(cfg: Config, log=print) -> dict:
    """Run the whole comparison; returns the summary (also in ``<run>/summary.json``)."""
    t0 = time.time()
    timings = {}
    dist_info = init_distributed(cfg.run.device)
    if dist_info.world > 1:
        raise ValueError("`compare` runs its trainings one after another in one process; use "
                         "`torchrun ... -m mdlm_ctc train` for DDP training, then `mdlm-ctc eval`")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    root = cfg.run_dir()
    os.makedirs(root, exist_ok=True)
    save_config(cfg, os.path.join(root, "config.yaml"))
    log(f"mdlm-ctc compare: run folder {root}")
    prepared = prepare(cfg, root, log=log)
    timings["prepare_s"] = time.time() - t0

    summaries, metrics, model_dirs = {}, {}, {}
    for objective in cfg.compare_objective_list():
        t1 = time.time()
        run_cfg = copy_config(cfg)
        run_cfg.objective.objective = objective
        run_dir = os.path.join(root, objective)
        summaries[objective] = train_run(run_cfg, prepared, run_dir, objective=objective, log=log)
        metrics[objective] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        model_dirs[objective] = os.path.join(run_dir, "final")
        timings[f"train_{objective}_s"] = time.time() - t1

    t2 = time.time()
    examples = prepared.eval_examples
    if cfg.eval.max_eval_examples:
        examples = examples[: cfg.eval.max_eval_examples]
    results, comparison = evaluate_runs(cfg, model_dirs, examples, root, log=log)
    timings["eval_s"] = time.time() - t2

    t3 = time.time()
    hf_params = None
    init_dir = prepared.init_source
    if os.path.isdir(init_dir) and os.path.exists(os.path.join(init_dir, "model.safetensors")):
        from safetensors import safe_open

        with safe_open(os.path.join(init_dir, "model.safetensors"), "pt") as f:
            hf_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    info = dict(prepared.info, vocab_size=len(prepared.tokenizer), eval_used=len(examples),
                parameters=hf_params if hf_params is not None else "?")
    timings["total_s"] = time.time() - t0
    report_path = write_report(root, cfg, results=results, comparison=comparison, train_summaries=summaries,
                               metrics=metrics, info=info, timings={k: v for k, v in timings.items()})
    timings["report_s"] = time.time() - t3
    timings["total_s"] = time.time() - t0
    fractions = cfg.shift_fraction_list()
    summary = {
        "run_dir": root, "report": report_path, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "train": summaries, "info": info,
        "results": {name: _strip_records(res) for name, res in results.items()},
        "comparison": _jsonable(comparison), "config": cfg.to_dict(),
    }
    tmp = os.path.join(root, f"summary.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(root, "summary.json"))
    table = summary_table(results, comparison, fractions)
    log("\n" + table)
    log(f"\nreport: {report_path}   (total {timings['total_s']:.0f} s)")
    summary["table"] = table
    return summary


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
