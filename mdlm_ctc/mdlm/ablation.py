"""``mdlm-ctc ablate``: the CTC design variants, fine-tuned from the main job's base, on the validation split.

Every variant is fine-tuned once per seed of ``finetune_seeds`` from the base model of the run folder
(the same ``<run>/base`` that ``compare`` uses: the shipped base with the default settings), with every
hyper-parameter of the comparison except the objective settings it names, and evaluated on the
**validation split** (``data.load_validation``: prompts in neither the training nor the evaluation set),
with the gap test when ``gap_test`` is on. The default of ``ObjectiveConfig`` is the variant that
:data:`RULE` picks here; the evaluation set is never looked at. ``variants search`` (the default) runs
:data:`SEARCH`, the design search on the shipped base; ``all`` adds the earlier one-seed ablation's
rows. The table goes to ``<run>/ablation/ablation.md`` and ``ablation.json``, and into ``compare``'s
report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from . import base as base_mod
from .compare import (_file_label, _jsonable, build_base, evaluate_folder, finetune_config, run_folder_lock,
                      train_once)
from .config import Config, copy_config
from .data import load_datasets, load_validation
from .evaluate import compare_seeded, gap_stats
from .report import ablation_markdown
from .train import prepare

@dataclass(frozen=True)
class Variant:
    """One row of the ablation: how it is trained (or which row's models it reuses) and sampled."""

    objective: str
    overrides: dict = field(default_factory=dict)  # ObjectiveConfig fields; the others keep the run's values
    description: str = ""
    sample: dict = field(default_factory=dict)     # SampleConfig fields for its evaluation
    reuses: str | None = None                      # evaluate this variant's trained models instead of training


_SHIFT10 = {"ctc_canvas": "eos", "slack_budget": 2, "slack_insertion": "random", "slack_rate": 0.1}
_PROBE30 = {"ctc_canvas": "eos", "slack_budget": 2, "slack_insertion": "probe", "slack_rate": 0.3}
_PROBE = "of rows show the shift probe's canvas (one token displaced right, its old position masked)"

VARIANTS: dict[str, Variant] = {
    "ce": Variant("ce", {}, "LLaDA SFT (the baseline)"),
    "slack-canvas": Variant("ctc", {"ctc_canvas": "slack", "slack_insertion": "random", "slack_rate": 0.1,
                                    "ctc_max_shift": None},
                            "the earlier design: answer + one EOS, slack padding, unbanded, random insertion 0.1"),
    "eos-b1": Variant("ctc", {"ctc_canvas": "eos", "slack_budget": 1, "slack_insertion": "none"},
                      "eos canvas, 1 slack slot, visible tokens at CE positions"),
    "eos-b2": Variant("ctc", {"ctc_canvas": "eos", "slack_budget": 2, "slack_insertion": "none"},
                      "eos canvas, 2 slack slots, visible tokens at CE positions"),
    "eos-b2-shift05": Variant("ctc", dict(_SHIFT10, slack_rate=0.05),
                              "eos canvas, 2 slots, visible canvas shifted before each token with probability 0.05"),
    "eos-b2-shift10": Variant("ctc", dict(_SHIFT10),
                              "eos canvas, 2 slots, visible canvas shifted before each token with probability 0.1"),
    "eos-b2-probe10": Variant("ctc", dict(_PROBE30, slack_rate=0.1), f"eos canvas, 2 slots, 10% {_PROBE}"),
    "eos-b2-probe20": Variant("ctc", dict(_PROBE30, slack_rate=0.2), f"eos canvas, 2 slots, 20% {_PROBE}"),
    "eos-b2-probe30": Variant("ctc", dict(_PROBE30), f"eos canvas, 2 slots, 30% {_PROBE}"),
    "eos-b2-probe30-visible": Variant("ctc", dict(_PROBE30, slack_insertion="probe_visible"),
                                      f"eos canvas, 2 slots, 30% {_PROBE}, the displaced token always visible (the "
                                      f"sampler's state: the gap test's suggestion)"),
    "mix-b2-probe30": Variant("ce+ctc", dict(_PROBE30, ctc_weight=0.5),
                              "0.5 CE + 0.5 CTC on the probe canvas of eos-b2-probe30 (CE's target at the gap is "
                              "the slack)"),
    "eos-b2-probe60": Variant("ctc", {"ctc_canvas": "eos", "slack_budget": 2, "slack_insertion": "probe",
                                      "slack_rate": 0.6},
                              "eos canvas, 2 slots, 60% of rows show the shift probe's canvas"),
    "eos-b2-best": Variant("ctc", {"ctc_canvas": "eos", "slack_budget": 2, "slack_insertion": "best"},
                           "eos canvas, 2 slots, visible tokens from the model's own Viterbi alignment"),
    "mix-b2-shift10": Variant("ce+ctc", dict(_SHIFT10, ctc_weight=0.5),
                              "0.5 CE (on the shifted canvas) + 0.5 CTC, eos canvas, 2 slots"),
    "ce-on-shift10": Variant("ce+ctc", dict(_SHIFT10, ctc_weight=0.0),
                             "control: position-wise CE on the same shifted canvases (no lattice)"),
    "eos-b2-probe30+budget": Variant("ctc", dict(_PROBE30), "eos-b2-probe30's models, sampler slack budget 2",
                                     sample={"sample_slack_budget": 2}, reuses="eos-b2-probe30"),
    "eos-b2-probe30+eosfill": Variant("ctc", dict(_PROBE30), "eos-b2-probe30's models, sampler EOS fill",
                                      sample={"eos_fill": True}, reuses="eos-b2-probe30"),
}
_CE_CONTROLS = ("ce", "ce-on-shift10")
# the design search (issue 21): the default before it, the probe canvas at three rates, with the displaced token
# always visible, and with a CE term
SEARCH = ("ce", "eos-b2", "eos-b2-probe10", "eos-b2-probe20", "eos-b2-probe30", "eos-b2-probe30-visible",
          "mix-b2-probe30")

MARGIN = 0.02
RULE = (f"among the CTC variants whose validation exact match without shift is at least `ce`'s minus {MARGIN:g}, "
        f"the one with the smallest exact-match drop at shift 0.05 (ties: the higher exact match); if none "
        f"qualifies, the CTC variant with the highest exact match without shift")


def variant_names(cfg: Config) -> list[str]:
    if cfg.compare.variants.strip() == "all":
        return list(VARIANTS)
    if cfg.compare.variants.strip() == "search":
        return list(SEARCH)
    names = [s.strip() for s in cfg.compare.variants.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"`variants` must be 'search', 'all' or names among {', '.join(VARIANTS)}; got "
                         f"{cfg.compare.variants!r}")
    for name in list(names):
        reused = VARIANTS[name].reuses
        if reused and reused not in names:
            names.insert(names.index(name), reused)
    if "ce" not in names:
        names.insert(0, "ce")
    return names


def choose(stats: dict, names: list[str]) -> str:
    """The variant that :data:`RULE` picks."""
    fam = stats["families"]
    ce0 = fam["ce"]["metrics"][stats["fractions"][0]]["exact"]["mean"]
    ctc = [n for n in names if n not in _CE_CONTROLS]
    if not ctc:
        return "ce"
    rho0 = stats["fractions"][0]

    def exact(n):
        return fam[n]["metrics"][rho0]["exact"]["mean"]

    ok = [n for n in ctc if exact(n) >= ce0 - MARGIN and 0.05 in fam[n]["drop"]]
    if ok:
        return min(ok, key=lambda n: (fam[n]["drop"][0.05]["mean"], -exact(n)))
    return max(ctc, key=exact)


def run_ablation(cfg: Config, log=print) -> dict:
    """Fine-tune and evaluate every variant on the validation split; write ``<run>/ablation/``."""
    with run_folder_lock(cfg.run_dir()):
        return _run_ablation(cfg, log)


def _run_ablation(cfg: Config, log=print) -> dict:
    t0 = time.time()
    commit = base_mod.commit()  # the code that runs, not whatever is checked out when it ends
    names = variant_names(cfg)
    root = cfg.run_dir()
    out_dir = os.path.join(root, "ablation")
    os.makedirs(out_dir, exist_ok=True)
    prepared = prepare(cfg, root, log=log)
    train_ex, eval_ex, _ = load_datasets(cfg)
    val, val_source = load_validation(cfg, train_ex, eval_ex)
    source, base_summary = build_base(cfg, prepared, root, log=log)
    ft_prepared = dataclasses.replace(prepared, init_source=source)
    seeds = cfg.finetune_seed_list()
    results = {}
    for name in names:
        variant = VARIANTS[name]
        trained = variant.reuses or name
        eval_cfg = copy_config(cfg)
        eval_cfg.sample = dataclasses.replace(eval_cfg.sample, **variant.sample)
        for seed in seeds:
            # the CE runs are the comparison's own (same settings by construction); the variants live apart
            run_dir = (os.path.join(root, "ft", "ce", f"seed{seed}") if trained == "ce" else
                       os.path.join(out_dir, "ft", _file_label(trained), f"seed{seed}"))
            if variant.reuses is None:
                run_cfg = finetune_config(cfg, variant.objective, seed, variant.overrides, source)
                train_once(run_cfg, ft_prepared, run_dir, variant.objective, log=log)
            results.setdefault(name, {})[seed] = evaluate_folder(eval_cfg, os.path.join(run_dir, "final"), val,
                                                                 out_dir, f"{name}/seed{seed}", log,
                                                                 gap=cfg.eval.gap_test)
    kw = dict(samples=cfg.eval.bootstrap_samples, confidence=cfg.eval.confidence, seed=cfg.run.seed)
    stats = compare_seeded(results, cfg.shift_fraction_list(), "ce", **kw)
    gap = None
    if cfg.eval.gap_test:
        gap = gap_stats({n: {sd: r["gap"] for sd, r in by.items()} for n, by in results.items()}, results,
                        cfg.shift_fraction_list()[0], "ce", **kw)
    chosen = choose(stats, names)
    ablation = {
        "fractions": cfg.shift_fraction_list(), "seeds": seeds, "examples": len(val), "source": val_source,
        "machine": base_mod.machine(), "commit": commit, "rule": RULE,
        "chosen": chosen, "seconds": round(time.time() - t0, 1), "base": base_mod.base_identity(source, base_summary),
        "variants": {name: {"objective": VARIANTS[name].objective, "overrides": VARIANTS[name].overrides,
                            "sample": VARIANTS[name].sample, "description": VARIANTS[name].description,
                            "stats": stats["families"][name],
                            "win_rate": stats["pairs"].get(name, {}).get(stats["fractions"][0], {}).get("win_rate"),
                            "exact_diff": stats["pairs"].get(name, {}).get(stats["fractions"][0], {}).get("exact_diff"),
                            "gap": None if gap is None else gap["families"][name],
                            "gap_pair": None if gap is None else gap["pairs"].get(name)}
                     for name in names},
    }
    ablation = json.loads(json.dumps(_jsonable(ablation)))
    with open(os.path.join(out_dir, "ablation.json"), "w") as f:
        json.dump(ablation, f, indent=1)
    text = "# CTC design ablation (validation split)\n\n" + ablation_markdown(ablation)
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write(text)
    log(text)
    log(f"chosen: {chosen}  ({ablation['seconds']:.0f} s; {os.path.join(out_dir, 'ablation.md')})")
    return ablation
