"""The main job: a CE base model, then CE and slack-CTC fine-tuning from it, evaluated like the paper.

``mdlm-ctc compare`` (no arguments) runs the embedded default on CPU, in the order of the paper
(arXiv 2601.22947: a CE-trained MDLM, fine-tuned with CE or with CTC, matched):

1. data: the embedded synthetic training set and a held-out evaluation set (``<run>/data/``);
2. tokenizer: trained offline on the training data (``<run>/tokenizer/``);
3. the **base model**: the tiny bidirectional Llama trained with LLaDA's masked CE for ``base_steps``
   from a seeded random initialisation (``<run>/base/``). With the default settings this is the base
   shipped with the package (``base``; ``base_source auto``), copied, not trained; other settings train
   it here, once, reused while its settings are unchanged;
4. **fine-tuning**: every objective of ``compare_objectives`` once per seed of ``finetune_seeds``
   (``<run>/ft/<objective>/seed<k>/``), all from the base weights; seed k gives every objective the
   same data order and masking noise, and every hyper-parameter is shared. With ``control`` the CTC
   objective is also fine-tuned with ``ctc_max_shift=0`` on the first seed (``ctc@ms0``), which on the
   ``eos`` canvas is CE by construction;
5. evaluation of the base and of every fine-tuned model at every shift fraction, and the gap test
   (``evaluate.gap_test``: one displacement, the model's answer to the gap) (``<run>/eval/``);
6. statistics over fine-tuning seeds and examples (``evaluate.compare_seeded``), ``report.md``, the
   plots, ``summary.json`` and the summary table on stdout.

With ``--config job.yaml`` (a real model and JSONL files) the same steps run a real job; with
``base_steps 0`` the fine-tunes start from the model itself. With ``--resume`` a killed comparison
continues: finished runs are skipped and an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time

import torch

from . import base as base_mod
from .checkpoint import source_identity
from .config import Config, copy_config, save_config
from .evaluate import compare_results, compare_seeded, evaluate_model, gap_stats, gap_test, summarise
from .model import DiffusionLM, load_model_dir, resolve_device
from .report import claims, seeded_summary_table, write_report
from .train import DONE_FILE, init_distributed, prepare, read_metrics, train_run

CONTROL = "ctc@ms0"


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
    """Evaluate every model folder; returns (results, pairwise comparison). Used by ``mdlm-ctc eval``."""
    results = {name: evaluate_folder(cfg, path, examples, root, name, log) for name, path in model_dirs.items()}
    return results, compare_results(results, cfg)


def evaluate_folder(cfg: Config, path: str, examples, root: str, name: str, log=print, gap: bool = False) -> dict:
    """Sample one model folder at every shift fraction (and, with ``gap``, run the gap test: ``result["gap"]``);
    per-example records go to ``<root>/eval/``. An evaluation already there of the same weights with the same
    sampler, fractions, seed and examples is read back instead of sampled again (``<label>.key.json``)."""
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    stem = os.path.join(root, "eval", _file_label(name))
    key = _eval_key(cfg, path, examples, gap)
    result = _cached_evaluation(cfg, stem, key, name, gap)
    if result is not None:
        log(f"[{name}] evaluation reused ({stem}.jsonl: same weights, sampler and examples)")
    else:
        device = resolve_device(cfg.run.device)
        hf, tokenizer, special = load_model_dir(path, cfg, device)
        model = DiffusionLM(hf).to(device)
        result = evaluate_model(model, tokenizer, special, examples, cfg, device=device, progress=cfg.run.progress,
                                label=name)
        _write_records(f"{stem}.jsonl", result)
        if gap:
            result["gap"] = gap_test(model, tokenizer, special, examples, cfg, device=device,
                                     progress=cfg.run.progress, label=name)
            _write_jsonl(f"{stem}-gap.jsonl", result["gap"]["records"])
        if key is not None:
            with open(f"{stem}.key.json", "w") as f:
                json.dump(key, f)
    s0 = result["fractions"][cfg.shift_fraction_list()[0]]["summary"]["exact"]
    log(f"[{name}] exact match {s0['mean']:.3f} [{s0['lo']:.3f}, {s0['hi']:.3f}] without shift")
    placed = [r for r in result["gap"]["records"] if r["placed"]] if gap else []
    if placed:
        log(f"[{name}] gap test: p(slack) {sum(r['p_slack'] for r in placed) / len(placed):.3f}, "
            f"p(duplicate) {sum(r['p_duplicate'] for r in placed) / len(placed):.3f} at the gap; exact match "
            f"{sum(r['exact_after'] for r in placed) / len(placed):.3f} after one displacement")
    return result


def _eval_key(cfg: Config, path: str, examples, gap: bool) -> dict | None:
    """What an evaluation's records depend on; None when the weights have no single file to hash."""
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        return None
    digest = hashlib.sha256(json.dumps([ex.to_json() for ex in examples]).encode()).hexdigest()
    sample = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "shift_fraction"}
    return {"weights": sha256_of(os.path.join(path, "model.safetensors")), "sample": sample,
            "fractions": cfg.shift_fraction_list(), "seed": cfg.run.seed, "examples": digest, "gap": gap,
            "wrap_chat": cfg.data.wrap_chat}


def _cached_evaluation(cfg: Config, stem: str, key: dict | None, name: str, gap: bool) -> dict | None:
    paths = [f"{stem}.key.json", f"{stem}.jsonl"] + ([f"{stem}-gap.jsonl"] if gap else [])
    if key is None or not all(os.path.exists(p) for p in paths):
        return None
    with open(f"{stem}.key.json") as f:
        if json.load(f) != json.loads(json.dumps(key)):
            return None
    by_rho = {rho: [] for rho in cfg.shift_fraction_list()}
    with open(f"{stem}.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            by_rho[rec.pop("shift_fraction")].append(rec)
    result = {"label": name, "fractions": {rho: {"records": recs, "summary": summarise(recs, cfg, cfg.run.seed)}
                                           for rho, recs in by_rho.items()}}
    if gap:
        with open(f"{stem}-gap.jsonl") as f:
            result["gap"] = {"label": name, "records": [json.loads(line) for line in f]}
    return result


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def _file_label(name: str) -> str:
    return name.replace("+", "_").replace("@", "_").replace("/", "-")


# ------------------------------------------------------------------------------ the stages
def base_config(cfg: Config) -> Config:
    """The configuration of the base model's CE pre-training."""
    b = copy_config(cfg)
    b.objective.objective = "ce"
    b.train.steps = cfg.base_step_count()
    b.train.lr = cfg.compare.base_lr
    b.train.warmup_steps = cfg.compare.base_warmup_steps
    b.train.init_from = None
    return b


_NOT_TRAINING = {
    "run": ("name", "output_dir", "progress", "threads"),
    "data": ("eval_file", "val_file", "synthetic_eval_size", "synthetic_val_size"),
    "train": ("resume", "log_every", "checkpoint_every", "keep_checkpoints"),
    "objective": ("compare_objectives",),
}
_CTC_ONLY = ("ctc_weight", "slack_insertion", "slack_rate", "ctc_max_shift", "ctc_canvas", "slack_budget",
             "slack_budget_ratio")


def settings_of(cfg: Config) -> dict:
    """What determines a trained model: not where it is written, how progress is shown, which examples are
    evaluated, nor (for CE) the CTC options."""
    d = cfg.to_dict()
    for section, names in _NOT_TRAINING.items():
        d[section] = {k: v for k, v in d[section].items() if k not in names}
    if cfg.objective.objective == "ce":
        d["objective"] = {k: v for k, v in d["objective"].items() if k not in _CTC_ONLY}
    for section in ("sample", "eval", "compare"):
        d.pop(section)
    return d


def same_settings(recorded: dict, current: dict) -> bool:
    """Whether a recorded run was trained with the current settings. Options that the recorded run did not
    know (added to the package since) count as unchanged; every option it recorded must be equal."""
    for section, values in recorded.items():
        now = current.get(section)
        if not isinstance(values, dict) or not isinstance(now, dict):
            if values != now:
                return False
            continue
        if any(key not in now or now[key] != value for key, value in values.items()):
            return False
    return True


def run_settings(cfg: Config, prepared) -> dict:
    """What identifies a run's result: :func:`settings_of` plus the identity of its initial weights."""
    settings = dict(settings_of(cfg), source={"weights": source_identity(prepared.init_source)})
    return json.loads(json.dumps(settings))


def train_once(cfg: Config, prepared, run_dir: str, objective: str, log=print) -> dict:
    """Train ``objective`` into ``run_dir``, or reuse a finished run there with the same settings.

    The settings are :func:`run_settings`, so that a retrained base also retrains the fine-tunes made
    from it. A run (finished or not) whose settings differ is trained again from scratch; an unfinished
    one with the same settings resumes from its last checkpoint.
    """
    settings_path = os.path.join(run_dir, "settings.json")
    settings = run_settings(cfg, prepared)
    if os.path.isdir(run_dir):
        same = False
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                same = same_settings(json.load(f), settings)
        if same and os.path.exists(os.path.join(run_dir, DONE_FILE)):
            with open(os.path.join(run_dir, DONE_FILE)) as f:
                summary = json.load(f)
            log(f"[{objective}] reusing {run_dir} ({summary['steps']} steps, same settings)")
            return summary
        if not same:  # finished or interrupted, with other settings (or none recorded): start again
            log(f"[{objective}] {run_dir} was trained with other settings; training it again")
            shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{settings_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, settings_path)
    run_cfg = copy_config(cfg)
    run_cfg.train.resume = cfg.train.resume or os.path.isdir(os.path.join(run_dir, "checkpoints"))
    return train_run(run_cfg, prepared, run_dir, objective=objective, log=log)


def finetune_plan(cfg: Config) -> list[tuple[str, str, int, dict]]:
    """(label, objective, seed, objective overrides) of every fine-tuning run, in training order."""
    plan = []
    seeds = cfg.finetune_seed_list()
    for seed in seeds:
        for objective in cfg.compare_objective_list():
            plan.append((objective, objective, seed, {}))
    if cfg.compare.control and "ctc" in cfg.compare_objective_list():
        plan.append((CONTROL, "ctc", seeds[0], {"ctc_max_shift": 0}))
    return plan


def finetune_config(cfg: Config, objective: str, seed: int, overrides: dict, source: str) -> Config:
    run_cfg = copy_config(cfg)
    run_cfg.run.seed = seed
    run_cfg.objective.objective = objective
    run_cfg.objective = dataclasses.replace(run_cfg.objective, **overrides)
    run_cfg.train.init_from = source
    return run_cfg.validate()


def build_base(cfg: Config, prepared, root: str, log=print) -> tuple[str, dict | None]:
    """The base model: the shipped one when this job's base settings are its settings (``base_source``
    ``auto`` or ``shipped``), else trained here (or reused); returns (its folder, its summary or None).

    The summary says where the base came from (``origin``: ``shipped`` or ``trained``) and carries its
    identity (``base.describe``), including whether its training was resumed after an interruption.
    """
    if cfg.base_step_count() == 0:
        return prepared.init_source, None
    base_dir = os.path.join(root, "base")
    final = os.path.join(base_dir, "final")
    bcfg = base_config(cfg)
    settings = run_settings(bcfg, prepared)
    if cfg.compare.base_source != "train":
        ok, why = base_mod.check_shipped(settings, prepared.tokenizer.get_vocab(), same_settings)
        if ok:
            return final, _use_shipped(base_dir, settings, log)
        if cfg.compare.base_source == "shipped":
            raise ValueError(f"`base_source` is 'shipped' but {why}; use base_source auto or train")
        log(f"[base] training the base here: {why}")
    if _origin(base_dir) == "shipped":  # a copy of the shipped base is not a base trained here
        shutil.rmtree(base_dir)
    summary = train_once(bcfg, prepared, base_dir, "ce", log=log)
    identity = base_mod.describe(final, settings, threads=summary.get("threads", torch.get_num_threads()),
                                 summary=summary)
    return final, dict(summary, origin="trained", identity=identity)


def _origin(base_dir: str) -> str | None:
    path = os.path.join(base_dir, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("origin")


def _use_shipped(base_dir: str, settings: dict, log=print) -> dict:
    """Copy the shipped base into ``base_dir/final`` (once) and return its summary."""
    identity = base_mod.read_identity()
    final = os.path.join(base_dir, "final")
    done = os.path.join(base_dir, DONE_FILE)
    if not (_origin(base_dir) == "shipped" and os.path.exists(os.path.join(final, base_mod.WEIGHTS_FILE))
            and base_mod.weights_sha256(final) == identity["sha256"]):
        shutil.rmtree(base_dir, ignore_errors=True)
        os.makedirs(base_dir)
        shutil.copytree(base_mod.ASSET_DIR, final)
        with open(os.path.join(base_dir, "settings.json"), "w") as f:
            json.dump(settings, f, indent=1)
        summary = {"objective": "ce", "steps": identity["steps"], "resumed_from": identity.get("resumed_from", 0),
                   "train_seconds": identity["train_seconds"], "final": {"loss": identity["final_loss"]},
                   "threads": identity["threads"], "origin": "shipped", "identity": identity}
        with open(done, "w") as f:
            json.dump(summary, f, indent=1)
    with open(done) as f:
        summary = json.load(f)
    log(f"[base] the shipped base (weights SHA-256 {identity['sha256'][:16]}..., {identity['steps']} steps, built with "
        f"{identity['threads']} thread(s) on {identity['machine']}); not trained here")
    return summary


@contextlib.contextmanager
def run_folder_lock(root: str):
    """Hold ``<root>/.lock`` while a job writes the folder: a second ``compare``/``ablate`` on the same run
    folder (which could retrain a base another process is reading) stops with a clear error."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"run folder {root} is in use by another mdlm-ctc compare/ablate process; wait for it "
                             f"or choose another --name") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ the job
def run_compare(cfg: Config, log=print) -> dict:
    """Run the whole comparison; returns the summary (also in ``<run>/summary.json``)."""
    with run_folder_lock(cfg.run_dir()):
        return _run_compare(cfg, log)


def _run_compare(cfg: Config, log=print) -> dict:
    t0 = time.time()
    timings = {}
    dist_info = init_distributed(cfg.run.device)
    if dist_info.world > 1:
        raise ValueError("`compare` runs its trainings one after another in one process; use "
                         "`torchrun ... -m mdlm_ctc train` for DDP training, then `mdlm-ctc eval`")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    load_start = os.getloadavg()
    root = cfg.run_dir()
    os.makedirs(root, exist_ok=True)
    save_config(cfg, os.path.join(root, "config.yaml"))
    log(f"mdlm-ctc compare: run folder {root}")
    prepared = prepare(cfg, root, log=log)
    timings["prepare_s"] = time.time() - t0

    t1 = time.time()
    source, base_summary = build_base(cfg, prepared, root, log=log)
    timings["base_s"] = time.time() - t1
    ft_prepared = dataclasses.replace(prepared, init_source=source)

    t1 = time.time()
    train_summaries, metrics, model_dirs = {}, {}, {}
    for label, objective, seed, overrides in finetune_plan(cfg):
        run_cfg = finetune_config(cfg, objective, seed, overrides, source)
        run_dir = os.path.join(root, "ft", _file_label(label), f"seed{seed}")
        summary = train_once(run_cfg, ft_prepared, run_dir, objective, log=log)
        train_summaries.setdefault(label, {})[seed] = summary
        metrics.setdefault(label, {})[seed] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        model_dirs.setdefault(label, {})[seed] = os.path.join(run_dir, "final")
    timings["finetune_s"] = time.time() - t1

    t2 = time.time()
    examples = prepared.eval_examples
    if cfg.eval.max_eval_examples:
        examples = examples[: cfg.eval.max_eval_examples]
    results = {}
    gap = cfg.eval.gap_test
    if base_summary is not None:
        results["base"] = {cfg.run.seed: evaluate_folder(cfg, source, examples, root, "base", log, gap=gap)}
    for label, by_seed in model_dirs.items():
        results[label] = {seed: evaluate_folder(cfg, path, examples, root, f"{label}/seed{seed}", log, gap=gap)
                          for seed, path in by_seed.items()}
    fractions = cfg.shift_fraction_list()
    baseline = cfg.compare_objective_list()[0]
    stats = compare_seeded(results, fractions, baseline, samples=cfg.eval.bootstrap_samples,
                           confidence=cfg.eval.confidence, seed=cfg.run.seed)
    if gap:
        stats["gap"] = gap_stats({label: {seed: res["gap"] for seed, res in by_seed.items()}
                                  for label, by_seed in results.items()}, results, fractions[0], baseline,
                                 samples=cfg.eval.bootstrap_samples, confidence=cfg.eval.confidence, seed=cfg.run.seed)
    timings["eval_s"] = time.time() - t2

    t3 = time.time()
    info = dict(prepared.info, vocab_size=len(prepared.tokenizer), eval_used=len(examples),
                parameters=_parameters(source), threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), load_start=list(load_start),
                load_end=list(os.getloadavg()), machine=base_mod.machine(), commit=base_mod.commit())
    ablation = _read_ablation(root)
    timings["total_s"] = time.time() - t0
    report_path = write_report(root, cfg, results=results, stats=stats, train_summaries=train_summaries,
                               base_summary=base_summary, metrics=metrics, info=info, timings=dict(timings),
                               ablation=ablation)
    timings["report_s"] = time.time() - t3
    timings["total_s"] = time.time() - t0
    summary = {
        "run_dir": root, "report": report_path, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "base": base_summary, "train": _jsonable(train_summaries), "info": info,
        "results": {label: {str(seed): _strip_records(res) for seed, res in by_seed.items()}
                    for label, by_seed in results.items()},
        "stats": _jsonable(stats), "config": cfg.to_dict(),
    }
    tmp = os.path.join(root, f"summary.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(root, "summary.json"))
    table = seeded_summary_table(stats)
    log("\n" + table + "\n\n" + "\n".join(claims(stats)))
    log(f"\nreport: {report_path}   (total {timings['total_s']:.0f} s)")
    summary["table"] = table
    return summary


def _parameters(folder: str):
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        return "?"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _read_ablation(root: str) -> dict | None:
    path = os.path.join(root, "ablation", "ablation.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
