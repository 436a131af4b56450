"""Build the shipped base model, and measure how much a base depends on float rounding.

    python -m mdlm_ctc.mdlm.build_base build [--threads 1] [--out mdlm_ctc/mdlm/assets/base]
    python -m mdlm_ctc.mdlm.build_base stability [--base-variants t1,t2,mb16] [options of `mdlm-ctc compare`]

``build`` trains the base of the default comparison (``compare.base_config``: LLaDA's masked CE from
the seeded random initialisation) with a fixed thread count and writes it, with its tokenizer and
its identity (``base.IDENTITY_FILE``: SHA-256 of the weights, the settings, the commit, the machine,
the thread count, torch's version, the final loss, the seconds), to the package's asset folder, from
which ``compare`` takes it whenever its base settings are the shipped ones. Rebuilt with the same
thread count on the same kind of machine, the weights are bitwise the same (the loop is seeded and
deterministic); on another thread count or CPU they differ in float rounding.

``stability`` is the check that the base recipe does not depend on that rounding: it builds one base
per variant of ``--base-variants`` (``t<N>``: N threads; ``mb<N>``: the batch summed over micro-batches
of N rows, the same update in another float order; the same settings otherwise), fine-tunes CE from
each on every seed of ``finetune_seeds`` (every fine-tune with the same thread count), evaluates them
on the validation split, and reports the difference between the bases' CE families against the
spread of the seeds within each (``<run>/stability.md``, ``stability.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from . import base as base_mod
from .config import SECTIONS, add_config_arguments, config_from_args, copy_config


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def build(cfg, out: str, threads: int, log=print) -> dict:
    """Train the base of ``cfg`` with ``threads`` threads into a scratch run folder, then write it and its
    identity to ``out``; returns the identity."""
    from .compare import base_config, run_settings, train_once
    from .train import prepare

    root = cfg.run_dir()
    cfg = copy_config(cfg)
    cfg.run.threads = threads
    _set_threads(threads)
    prepared = prepare(cfg, root, log=log)
    bcfg = base_config(cfg)
    summary = train_once(bcfg, prepared, os.path.join(root, "base"), "ce", log=log)
    identity = base_mod.describe(os.path.join(root, "base", "final"), run_settings(bcfg, prepared), threads=threads,
                                 summary=summary)
    base_mod.install(os.path.join(root, "base", "final"), out, identity)
    log(f"base written to {out}: sha256 {identity['sha256']}, final loss {identity['final_loss']:.4f}, "
        f"{threads} thread(s)")
    return identity


def parse_variant(spec: str, default_threads: int) -> tuple[int, dict]:
    """A base variant of the stability check: ``t<N>`` (N threads) or ``mb<N>`` (the batch computed as micro-batches
    of N rows: the same update, summed in another order); returns (threads, training overrides)."""
    if spec.startswith("t") and spec[1:].isdigit() and int(spec[1:]) >= 1:
        return int(spec[1:]), {}
    if spec.startswith("mb") and spec[2:].isdigit() and int(spec[2:]) >= 1:
        return default_threads, {"micro_batch_size": int(spec[2:])}
    raise ValueError(f"`base-variants` entries are t<threads> or mb<micro-batch rows>; got {spec!r}")


def stability(cfg, variants: list[str], finetune_threads: int, log=print) -> dict:
    """One base per variant (``parse_variant``: another thread count, or another summation order), CE fine-tunes
    from each on every seed, evaluated on the validation split."""
    from .compare import base_config, evaluate_folder, finetune_config, run_settings, train_once
    from .data import load_datasets, load_validation
    from .evaluate import compare_seeded
    from .train import prepare

    t0 = time.time()
    commit = base_mod.commit()  # the code that runs, not whatever is checked out when it ends
    root = cfg.run_dir()
    prepared = prepare(cfg, root, log=log)
    train_ex, eval_ex, _ = load_datasets(cfg)
    val, val_source = load_validation(cfg, train_ex, eval_ex)
    seeds = cfg.finetune_seed_list()
    results, bases = {}, {}
    for spec in variants:
        threads, overrides = parse_variant(spec, finetune_threads)
        _set_threads(threads)
        bcfg = base_config(cfg)
        bcfg.run.threads = threads
        bcfg.train = dataclasses.replace(bcfg.train, **overrides)
        base_dir = os.path.join(root, f"base-{spec}")
        summary = train_once(bcfg, prepared, base_dir, "ce", log=log)
        source = os.path.join(base_dir, "final")
        bases[spec] = dict(base_mod.describe(source, run_settings(bcfg, prepared), threads=threads, summary=summary),
                           overrides=overrides)
        _set_threads(finetune_threads)
        label = f"ce@base-{spec}"
        ft_prepared = dataclasses.replace(prepared, init_source=source)
        for seed in seeds:
            run_cfg = finetune_config(cfg, "ce", seed, {}, source)
            run_cfg.run.threads = finetune_threads
            run_dir = os.path.join(root, "ft", f"base-{spec}", f"seed{seed}")
            train_once(run_cfg, ft_prepared, run_dir, "ce", log=log)
            results.setdefault(label, {})[seed] = evaluate_folder(run_cfg, os.path.join(run_dir, "final"), val, root,
                                                                  f"{label}/seed{seed}", log)
    labels = list(results)
    stats = compare_seeded(results, cfg.shift_fraction_list(), labels[0], samples=cfg.eval.bootstrap_samples,
                           confidence=cfg.eval.confidence, seed=cfg.run.seed)
    out = {"variants": variants, "finetune_threads": finetune_threads, "seeds": seeds,
           "examples": len(val), "source": val_source, "machine": base_mod.machine(), "commit": commit,
           "base_steps": cfg.base_step_count(), "base_lr": cfg.compare.base_lr,
           "base_warmup_steps": cfg.compare.base_warmup_steps, "bases": bases,
           "seconds": round(time.time() - t0, 1), "stats": stats}
    from .compare import _jsonable

    out = json.loads(json.dumps(_jsonable(out)))
    out["verdict"] = stability_verdict(out)
    with open(os.path.join(root, "stability.json"), "w") as f:
        json.dump(out, f, indent=1)
    text = stability_markdown(out)
    with open(os.path.join(root, "stability.md"), "w") as f:
        f.write(text)
    log(text)
    return out


def stability_verdict(result: dict) -> dict:
    """Whether the bases' CE families agree within the seed spread: the difference of their mean exact match
    (without shift) against the largest range of seed means within one family, and the difference's
    interval (seeds and examples resampled) against 0."""
    stats = result["stats"]
    rho0 = str(stats["fractions"][0])
    fams = stats["families"]
    means = {k: v["metrics"][rho0]["exact"]["mean"] for k, v in fams.items()}
    ranges = {k: max(v["metrics"][rho0]["exact"]["seed_means"]) - min(v["metrics"][rho0]["exact"]["seed_means"])
              for k, v in fams.items()}
    diffs = {k: v[rho0]["exact_diff"] for k, v in stats["pairs"].items()}
    spread = max(ranges.values())
    gap = max(means.values()) - min(means.values())
    within = gap <= spread and all(d["lo"] <= 0 <= d["hi"] for d in diffs.values())
    return {"means": means, "seed_ranges": ranges, "gap": gap, "spread": spread, "differences": diffs,
            "within_seed_spread": within}


def stability_markdown(result: dict) -> str:
    from .report import _ci, _md_table

    stats, v = result["stats"], result["verdict"]
    rho0 = str(stats["fractions"][0])
    rows = [["base", "threads", "micro-batch", "base final loss", "weights (SHA-256, first 12)",
             "CE fine-tunes: exact match (validation)", "per seed", "seed range"]]
    for label, fam in stats["families"].items():
        spec = label.split("@base-", 1)[1]
        b = result["bases"][spec]
        e = fam["metrics"][rho0]["exact"]
        rows.append([f"`base-{spec}`", str(b["threads"]), str(b["overrides"].get("micro_batch_size", "-")),
                     f"{b['final_loss']:.4f}", f"`{b['sha256'][:12]}`", _ci(e),
                     " / ".join(f"{x:.3f}" for x in e["seed_means"]), f"{v['seed_ranges'][label]:.3f}"])
    lines = [f"Base recipe: {result['base_steps']} steps, lr {result['base_lr']:g}, {result['base_warmup_steps']} "
             f"warmup steps; one base per variant ({', '.join(result['variants'])}: `t<N>` N threads, `mb<N>` the "
             f"batch summed over micro-batches of N rows, the same update in another float order), the same "
             f"settings otherwise. CE fine-tuned from each on seeds {', '.join(map(str, result['seeds']))} "
             f"({result['finetune_threads']} thread(s) for every fine-tune), evaluated on the validation split "
             f"({result['examples']} examples). {result['machine']}, commit `{result['commit']}`, "
             f"{result['seconds']:.0f} s.\n", _md_table(rows) + "\n"]
    for label, d in v["differences"].items():
        lines.append(f"* `{label}` minus `{stats['baseline']}`: {_ci(d)} (seeds paired, seeds and examples "
                     f"resampled).")
    lines.append(f"* Gap between the bases' CE families {v['gap']:.3f} against the largest seed range "
                 f"{v['spread']:.3f}: " + ("**within the seed spread**" if v["within_seed_spread"] else
                                           "**not within the seed spread**") + ".\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdlm_ctc.mdlm.build_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the default base and write it with its identity")
    b.add_argument("--out", default=base_mod.ASSET_DIR, help="folder to write (default: the package's asset)")
    b.add_argument("--base-threads", dest="base_threads", type=int, default=1, help="threads of the build")
    s = sub.add_parser("stability", help="one base per variant, CE fine-tunes from each, on validation")
    s.add_argument("--base-variants", dest="base_variants", default="t1,t2,mb16",
                   help="comma-separated base variants: t<N> (N threads), mb<N> (micro-batches of N rows)")
    s.add_argument("--finetune-threads", dest="finetune_threads", type=int, default=0,
                   help="threads of every fine-tune (0: os.cpu_count())")
    for sp in (b, s):
        add_config_arguments(sp, tuple(SECTIONS), exclude={"checkpoint", "baseline", "prompt", "num_samples",
                                                           "show_canvas", "shift_fraction", "merge_output"})
    args = parser.parse_args(argv)
    command = args.command
    extra = {name: getattr(args, name) for name in ("command", "out", "base_threads", "base_variants",
                                                    "finetune_threads") if hasattr(args, name)}
    for name in extra:
        delattr(args, name)
    cfg = config_from_args(args)
    if command == "build":
        if cfg.run.name == "default":
            cfg.run.name = "shipped-base"
        build(cfg, extra["out"], int(extra["base_threads"]))
    else:
        if cfg.run.name == "default":
            cfg.run.name = "stability"
        variants = [x.strip() for x in str(extra["base_variants"]).split(",") if x.strip()]
        stability(cfg, variants, extra["finetune_threads"] or os.cpu_count() or 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
