"""The comparison report: Markdown, PNG plots (matplotlib, Agg backend) and the printed summary table.

The report states what was measured, with intervals, and reads the intervals literally: a difference
whose interval contains 0 is reported as "no significant difference", whichever way the point estimate
leans. The comparison's intervals are two-way bootstraps over fine-tuning seeds and evaluation examples
(``evaluate.crossed_bootstrap``); ``mdlm-ctc eval``'s are over examples of one model.
"""

from __future__ import annotations

import os
import platform
import time

from .base import base_identity


def _ci(stat: dict, digits: int = 3, pct: bool = False) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(stat['mean'])} [{f(stat['lo'])}, {f(stat['hi'])}]"


def _mde(stat: dict) -> str:
    """The smallest difference the design detects at 80% power (``evaluate.detectable_difference``)."""
    return f"detects ±{stat['detectable']:.3f}" if "detectable" in stat else ""


def _ci_mde(stat: dict) -> str:
    return f"{_ci(stat)} ({_mde(stat)})" if "detectable" in stat else _ci(stat)


def _verdict(stat: dict, better: str, worse: str) -> str:
    if stat["lo"] > 0:
        return better
    if stat["hi"] < 0:
        return worse
    return "no significant difference"


# ------------------------------------------------------------------------------ plots
def plot_loss_curves(curves: dict[str, dict], path: str) -> None:
    """One panel per model family (the base, then each objective), every seed a line; two panels a row."""
    import math

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for i, (seed, rows_) in enumerate(sorted(curves[name].items())):
            steps = [r["step"] for r in rows_]
            ax.plot(steps, [r["loss"] for r in rows_], color=f"C{i}", lw=1.0, label=f"seed {seed}")
            if name.startswith("ce+ctc") and rows_ and all(k in r for r in rows_ for k in ("ce", "ctc")):
                ax.plot(steps, [r["ce"] for r in rows_], color=f"C{i}", lw=0.7, ls="--", alpha=0.7)
                ax.plot(steps, [r["ctc"] for r in rows_], color=f"C{i}", lw=0.7, ls=":", alpha=0.7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel("loss (1/p weighted)", fontsize=9)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.tick_params(labelsize=8)
        ax.tick_params(which="minor", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle("Training loss, mean over each logging window (scales differ between objectives)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shift_robustness(stats: dict, path: str) -> None:
    """Exact match against the shift fraction, one line per model family (seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = stats["fractions"]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    families = stats["families"]
    for i, (name, fam) in enumerate(families.items()):
        ys = [fam["metrics"][f]["exact"] for f in fractions]
        mean = [y["mean"] for y in ys]
        err = [[y["mean"] - y["lo"] for y in ys], [y["hi"] - y["mean"] for y in ys]]
        offset = 0.002 * (i - (len(families) - 1) / 2)
        ax.errorbar([f + offset for f in fractions], mean, yerr=err, marker="o", capsize=3,
                    label=f"{name} ({len(fam['seeds'])} seed{'s' if len(fam['seeds']) > 1 else ''})")
    ax.set_xlabel("shift fraction (probability that a committed content token is displaced by one position)")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Shift robustness (intervals over fine-tuning seeds and examples)", fontsize=10)
    ax.xaxis.label.set_size(8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_task(stats: dict, fraction: float, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats["families"])
    tasks = sorted(stats["families"][names[0]]["per_task_exact"][fraction])
    if not tasks:
        return False
    fig, ax = plt.subplots(figsize=(1.5 * len(tasks) + 2, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per = stats["families"][name]["per_task_exact"][fraction]
        mean = [per[t]["mean"] for t in tasks]
        err = [[per[t]["mean"] - per[t]["lo"] for t in tasks], [per[t]["hi"] - per[t]["mean"] for t in tasks]]
        ax.bar([j + i * width for j in range(len(tasks))], mean, width, yerr=err, capsize=2, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Exact match per task (shift fraction {fraction:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ tables
def summary_table(results: dict, comparison: dict | None, fractions: list[float]) -> str:
    """The plain-text table printed at the end of a comparison."""
    base = fractions[0]
    header = ["objective", f"exact@{base:g} [95% CI]", "edit dist", "len err", "slack", "no-EOS", "extra rep"]
    header += [f"exact@{f:g}" for f in fractions[1:]]
    if comparison:
        header.append(f"win vs {comparison['baseline']}@{base:g} [CI]")
    lines = [header]
    for name, res in results.items():
        s = res["fractions"][base]["summary"]
        row = [name, _ci(s["exact"]), f"{s['edit']['mean']:.3f}", f"{s['length_error']['mean']:.2f}",
               f"{s['slack_rate']['mean']:.2f}", f"{s['no_eos']['mean']:.2f}", f"{s['extra_repeats']['mean']:.2f}"]
        row += [f"{res['fractions'][f]['summary']['exact']['mean']:.3f}" for f in fractions[1:]]
        if comparison:
            pair = comparison["pairs"].get(name)
            row.append(_ci(pair[base]["win_rate"]) if pair else "(baseline)")
        lines.append(row)
    return _text_table(lines)


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _text_table(lines: list[list[str]]) -> str:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def seeded_summary_table(stats: dict) -> str:
    """The plain-text table printed at the end of a comparison (seeds pooled)."""
    fractions = stats["fractions"]
    rho0 = fractions[0]
    base = stats["baseline"]
    header = ["model", "seeds", f"exact@{rho0:g} [95% CI]", "len err", "slack", "no-EOS"]
    header += [f"exact@{f:g}" for f in fractions[1:]]
    header += [f"drop@{f:g}" for f in fractions[1:] if f in (0.05,)]
    header.append(f"win vs {base}@{rho0:g} [CI]")
    lines = [header]
    for name, fam in stats["families"].items():
        m = fam["metrics"][rho0]
        row = [name, str(len(fam["seeds"])), _ci(m["exact"]), f"{m['length_error']['mean']:.2f}",
               f"{m['slack_rate']['mean']:.2f}", f"{m['no_eos']['mean']:.2f}"]
        row += [f"{fam['metrics'][f]['exact']['mean']:.3f}" for f in fractions[1:]]
        row += [f"{fam['drop'][f]['mean']:.3f}" for f in fractions[1:] if f in (0.05,)]
        pair = stats["pairs"].get(name)
        row.append(_ci(pair[rho0]["win_rate"]) if pair else ("(baseline)" if name == base else "-"))
        lines.append(row)
    return _text_table(lines)


def claims(stats: dict, ctc: str = "ctc", margin: float = 0.02) -> list[str]:
    """The paper's two claims, the goal and the gap test, each read from the intervals (one line each)."""
    from .evaluate import detectable_difference

    base = stats["baseline"]
    fractions = stats["fractions"]
    rho0 = fractions[0]
    fam = stats["families"]
    out = []
    if base in fam and 0.01 in fam[base]["drop"]:
        d = fam[base]["drop"][0.01]
        verdict = ("supported: the interval of the drop excludes 0" if d["lo"] > 0 else
                   "not supported at this sample size: the interval of the drop includes 0" if d["hi"] >= 0 else
                   "contradicted: the model gains accuracy under the shift")
        out.append(f"* **Claim 1, a CE model loses accuracy under a 1% shift.** `{base}` exact-match drop at "
                   f"shift 0.01: {_ci(d)} (the design detects a drop of {detectable_difference(d):.3f}) -> {verdict}.")
    elif base in fam:
        out.append("* **Claim 1, a CE model loses accuracy under a 1% shift.** Not measured: 0.01 is not among "
                   "`shift_fractions`.")
    pair = stats["pairs"].get(ctc)
    if pair is None:
        return out
    diff = pair[rho0]["exact_diff"]
    if diff["lo"] > 0:
        level = "beats"
    elif diff["lo"] >= -margin:
        level = f"matches (the interval's lower end is within {margin:g} of 0)"
    elif diff["hi"] < 0:
        level = "is worse than"
    else:
        level = f"cannot be told apart from, nor shown within {margin:g} of,"
    drops = []
    for f in fractions[1:]:
        if f > 0.05 + 1e-12:
            continue
        d = pair[f]["drop_diff"]
        drops.append(f"{f:g}: {_ci_mde(d)}, {_verdict(d, 'loses less', 'loses more')}")
    out.append(f"* **Claim 2, CTC matches or beats CE and loses less under shift.** Without shift `{ctc}` {level} "
               f"`{base}`: exact-match difference {_ci_mde(diff)}, win rate {_ci(pair[rho0]['win_rate'])}. "
               + (f"Difference of drops (`{base}`'s drop minus `{ctc}`'s) at shift " + "; ".join(drops) + "." if drops
                  else "Drops not measured (no shift fraction in (0, 0.05] among `shift_fractions`)."))
    if 0.05 not in pair:
        out.append("* **Goal**: not measured (0.05 is not among `shift_fractions`).")
    else:
        d5 = pair[0.05]["drop_diff"]
        if diff["lo"] >= -margin:
            acc = f"met (the interval's lower end {diff['lo']:+.3f} is at least -{margin:g})"
        elif diff["hi"] < -margin:
            acc = f"not met (the whole interval is below -{margin:g})"
        else:
            acc = f"not shown (the interval [{diff['lo']:+.3f}, {diff['hi']:+.3f}] crosses -{margin:g})"
        drop = ("met" if d5["lo"] > 0 else "not met") + f" ({_ci_mde(d5)})"
        out.append(f"* **Goal** (CTC's exact match without shift at least CE's minus {margin:g}, and a smaller drop at "
                   f"5% shift, each shown by its interval): accuracy {acc}; drop {drop}.")
    gap = stats.get("gap")
    if gap and ctc in gap.get("pairs", {}) and base in gap["families"]:
        out.append(mechanism_line(gap, ctc))
    return out


MATERIAL_P_SLACK = 0.01  # a rise of p(<slack>) at the gap smaller than this is no rise (1 point of probability)


def mechanism_line(gap: dict, ctc: str = "ctc") -> str:
    """The gap test's verdict: does the CTC model answer a displacement with ``<slack>`` where CE duplicates?
    A rise in p(``<slack>``) counts when its interval's lower end is at least :data:`MATERIAL_P_SLACK`."""
    import math

    base = gap["baseline"]
    a, b, pair = gap["families"][ctc], gap["families"][base], gap["pairs"][ctc]
    if any(math.isnan(x) for x in (a["p_slack"]["mean"], b["p_slack"]["mean"], pair["p_slack"]["mean"])):
        return ("* **Mechanism (the gap test)**: not measured: no displacement could be made (the models committed "
                "no content token with a free right neighbour).")
    raised = pair["p_slack"]["lo"] >= MATERIAL_P_SLACK
    fills = a["final_slack"]["mean"] > max(a["final_duplicate"]["mean"], a["final_other"]["mean"],
                                           a["final_eos"]["mean"])
    spared = pair["drop_diff"]["lo"] > 0
    if raised and fills and spared:
        verdict = "the mechanism works here: CTC fills the gap with slack and loses less to the displacement"
    elif raised and not fills:
        verdict = ("the mechanism is weak here: CTC gives slack more probability at the gap than CE, but what it "
                   "writes there is most often not slack")
    elif raised:
        verdict = ("CTC fills the gap with slack more than CE, but its exact match after the displacement is not "
                   "shown to suffer less")
    else:
        verdict = (f"no sign of the mechanism: CTC gives slack no more probability at the gap than CE (not shown "
                   f"to exceed it by {MATERIAL_P_SLACK:g})")
    return (f"* **Mechanism (the gap test)**: after one displacement, p(`<slack>`) at the gap is "
            f"{_ci(a['p_slack'])} for `{ctc}` and {_ci(b['p_slack'])} for `{base}` (difference "
            f"{_ci_mde(pair['p_slack'])}); p(duplicate) {a['p_duplicate']['mean']:.3f} and "
            f"{b['p_duplicate']['mean']:.3f}. What ends at the gap: slack {100 * a['final_slack']['mean']:.0f}% / "
            f"duplicate {100 * a['final_duplicate']['mean']:.0f}% for `{ctc}`, slack "
            f"{100 * b['final_slack']['mean']:.0f}% / duplicate {100 * b['final_duplicate']['mean']:.0f}% for "
            f"`{base}`. Loss of exact match to the displacement: {_ci(a['drop'])} against {_ci(b['drop'])} "
            f"(difference, `{base}`'s minus `{ctc}`'s: {_ci_mde(pair['drop_diff'])}) -> {verdict}.")


def gap_markdown(gap: dict) -> str:
    """The gap test's table (one row per model family) and how to read it."""
    rows = [["model", "seeds", "displaced", "p(slack) at the gap", "p(duplicate)", "p(other)",
             "top choice: slack / dup / EOS / other", "written at the gap: slack / dup / EOS / other",
             "exact match after", "undisturbed", "loss to one displacement"]]
    for name, f in gap["families"].items():
        pct = lambda key: " / ".join(f"{100 * f[f'{key}_{k}']['mean']:.0f}%" for k in ("slack", "duplicate", "eos",  # noqa: E731
                                                                                        "other"))
        rows.append([f"`{name}`", str(len(f["seeds"])), f"{f['placed']['mean']:.3f}", _ci(f["p_slack"]),
                     _ci(f["p_duplicate"]), f"{f['p_other']['mean']:.3f}", pct("top"), pct("final"),
                     _ci(f["exact_after"]), f"{f['exact_before']['mean']:.3f}" if "exact_before" in f else "-",
                     _ci(f["drop"]) if "drop" in f else "-"])
    text = [_md_table(rows) + "\n"]
    if gap["pairs"]:
        rows = [["model", "seeds", "p(slack) difference", "exact match after, difference",
                 f"loss to one displacement, difference (`{gap['baseline']}`'s minus this)"]]
        for name, p in gap["pairs"].items():
            rows.append([f"`{name}`", ",".join(map(str, p["seeds"])), _ci_mde(p["p_slack"]), _ci_mde(p["exact_after"]),
                         _ci_mde(p["drop_diff"])])
        text.append(f"Against `{gap['baseline']}` (paired seeds and examples):\n")
        text.append(_md_table(rows) + "\n")
    return "\n".join(text)


def write_report(root: str, cfg, *, results: dict, stats: dict, train_summaries: dict, base_summary: dict | None,
                 metrics: dict, info: dict, timings: dict, ablation: dict | None = None) -> str:
    """Write ``report.md`` and the PNGs into ``root``; returns the report path."""
    import torch
    import transformers

    fractions = stats["fractions"]
    rho0 = fractions[0]
    fam = stats["families"]
    names = list(fam)
    base_name = stats["baseline"]
    curves = {}
    if base_summary is not None and os.path.exists(os.path.join(root, "base", "metrics.jsonl")):
        from .train import read_metrics

        curves["base (ce)"] = {cfg.run.seed: read_metrics(os.path.join(root, "base", "metrics.jsonl"))}
    for label, by_seed in metrics.items():
        curves[f"{label} fine-tuning"] = by_seed
    plot_loss_curves(curves, os.path.join(root, "loss_curves.png"))
    plot_shift_robustness(stats, os.path.join(root, "shift_robustness.png"))
    has_tasks = plot_per_task(stats, rho0, os.path.join(root, "per_task.png"))
    o, t, s, m, c = cfg.objective, cfg.train, cfg.sample, cfg.model, cfg.compare
    seeds = cfg.finetune_seed_list()
    L = [f"# mdlm-ctc comparison: `{cfg.run.name}`\n"]
    L.append(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node() or 'unknown host'} "
             f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
             f"{transformers.__version__}). Total wall time {timings.get('total_s', 0):.0f} s "
             f"(" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total_s") + ").\n")

    L.append("## Protocol\n")
    model_desc = (f"embedded tiny bidirectional Llama (`is_causal=False`, hidden {m.tiny_hidden_size}, "
                  f"{m.tiny_layers} layers, {m.tiny_heads} heads, {info.get('parameters', '?'):,} parameters)"
                  if m.model == "embedded" else f"`{m.model}`")
    L.append(f"* **Model**: {model_desc}; vocabulary {info.get('vocab_size', '?')} tokens.")
    dropped = f", {info['dropped_too_long']} dropped as too long" if info.get("dropped_too_long") else ""
    L.append(f"* **Data**: training {info.get('train_source')} ({info.get('train_rows')} rows used{dropped}); "
             f"evaluation {info.get('eval_source')} ({info.get('eval_used')} examples, no prompt seen in training).")
    if base_summary is not None:
        L.append(f"* **Base model** (the paper's starting point, a CE-trained MDLM): LLaDA's masked CE for "
                 f"{cfg.base_step_count()} steps of {t.batch_size} rows from a random initialisation (seed {cfg.run.seed}), "
                 f"AdamW lr {c.base_lr:g}, {c.base_warmup_steps} warmup steps, {t.schedule} schedule. "
                 + base_provenance(base_summary))
    else:
        L.append(f"* **Base model**: `{m.model}` as loaded (`base_steps` 0).")
    L.append(f"* **Fine-tuning** (matched): every objective starts from the base weights and runs {t.steps} steps "
             f"of {t.batch_size} rows, AdamW lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup steps), clip "
             f"{t.grad_clip:g}, once per fine-tuning seed ({', '.join(map(str, seeds))}); seed k gives every "
             f"objective the same rows in the same order with the same masking noise. Only the objective differs.")
    budget = f"{o.slack_budget}" + (f" + ceil({o.slack_budget_ratio:g} x answer length)" if o.slack_budget_ratio else "")
    if o.ctc_canvas == "eos":
        canvas = (f"LLaDA's canvas: the target is the answer and its EOS padding less {budget} EOS, so every "
                  f"admissible canvas holds exactly that many `<slack>` tokens, anywhere (between answer tokens, "
                  f"or among the EOS tail)")
    else:
        canvas = "the answer and one EOS, padded with `<slack>`"
    insertion = o.slack_insertion + (f" (rate {o.slack_rate:g})" if o.slack_insertion == "random" else "")
    L.append(f"* **Objectives**: `ce` = LLaDA SFT (masked CE / p on the answer and its EOS padding); `ctc` = "
             f"slack-CTC on {canvas}; visible tokens come from a clean canvas with slack insertion `{insertion}`; "
             f"masked positions are free, visible ones observed; / p; `ctc_max_shift` {o.ctc_max_shift}. "
             f"Normalisation `{o.normalization}` for both."
             + (f" `{names[-1]}` is the control: `ctc` with `ctc_max_shift=0` (no slack freedom), which is CE by "
                f"construction, fine-tuned on seed {seeds[0]}." if any(n.endswith('@ms0') for n in names) else ""))
    L.append(f"* **Sampler**: LLaDA low-confidence remasking, gen_length {s.gen_length}, {s.sample_steps} steps, "
             f"block {s.block_length}, temperature {s.temperature:g}; slack deleted, text cut at the first EOS. "
             f"**Shift probe** (the paper's): each committed content token is displaced by one position "
             f"({s.shift_direction}) with the given probability; the realised rate is in the tables.")
    L.append(f"* **Statistics**: {int(cfg.eval.confidence * 100)}% two-way percentile-bootstrap intervals "
             f"({cfg.eval.bootstrap_samples} resamples): each resample draws the fine-tuning seeds with replacement "
             f"and the evaluation examples with replacement, so an interval includes training-seed variance and "
             f"example variance. Differences are paired (same seed, same example). With {len(seeds)} seeds the "
             f"seed part of an interval is coarse. **Power**: beside a difference's interval, \"detects ±x\" is the "
             f"smallest true difference this design ({info.get('eval_used')} examples x {len(seeds)} seeds) detects "
             f"with 80% power in a two-sided test at the interval's level: x = (1.96 + 0.84) x SE, with SE = the "
             f"interval's width / 3.92 (normal approximation; the same spread assumed under the alternative).")
    if info.get("threads"):
        L.append(f"* **Compute**: {info.get('machine', '?')}, {info['threads']} torch thread(s), OMP_WAIT_POLICY "
                 f"{info.get('omp_wait_policy') or 'unset'}, load average {info['load_start'][0]:.1f} at the start and "
                 f"{info['load_end'][0]:.1f} at the end, commit `{info.get('commit', '?')}`.")
    L.append("")

    L.append(f"## Results without shift\n")
    rows = [["model", "seeds", "exact match", "per-seed exact match", "normalised edit distance",
             "length error (tokens)", "slack rate", "no-EOS rate", "extra adjacent repeats"]]
    for name in names:
        sm = fam[name]["metrics"][rho0]
        rows.append([f"`{name}`", str(len(fam[name]["seeds"])), _ci(sm["exact"]),
                     " / ".join(f"{x:.3f}" for x in sm["exact"]["seed_means"]), _ci(sm["edit"]),
                     _ci(sm["length_error"], 2), f"{sm['slack_rate']['mean']:.3f}", f"{sm['no_eos']['mean']:.3f}",
                     _ci(sm["extra_repeats"])])
    L.append(_md_table(rows) + "\n")

    L.append("## Shift robustness\n")
    L.append("![shift robustness](shift_robustness.png)\n")
    rows = [["shift fraction"] + [f"`{n}` exact match" for n in names] + ["displaced (realised)"]]
    for f in fractions:
        row = [f"{f:g}"] + [_ci(fam[n]["metrics"][f]["exact"]) for n in names]
        row.append(" / ".join(f"{fam[n]['metrics'][f]['displaced_fraction']:.3f}" for n in names))
        rows.append(row)
    L.append(_md_table(rows) + "\n")
    if len(fractions) > 1:
        L.append("Drop = exact match without shift minus exact match at the shift (paired per seed and example):\n")
        rows = [["shift fraction"] + [f"`{n}` drop" for n in names]]
        for f in fractions[1:]:
            rows.append([f"{f:g}"] + [_ci(fam[n]["drop"][f]) for n in names])
        L.append(_md_table(rows) + "\n")

    if stats["pairs"]:
        L.append(f"## Against `{base_name}`\n")
        L.append("Win rate: per example and seed, a win is exact while the baseline is not, or a lower edit distance "
                 "when neither is exact; ties count one half; 0.5 = no difference.\n")
        rows = [["model", "seeds", "shift", "exact-match difference", "win rate", "wins / losses / ties",
                 f"drop difference (`{base_name}` drop - this drop)"]]
        for name, pair in stats["pairs"].items():
            for f in fractions:
                p = pair[f]
                wr = p["win_rate"]
                rows.append([f"`{name}`", ",".join(map(str, pair["seeds"])), f"{f:g}", _ci_mde(p["exact_diff"]),
                             _ci(wr), f"{wr['wins']} / {wr['losses']} / {wr['ties']}",
                             _ci_mde(p["drop_diff"]) if "drop_diff" in p else "-"])
        L.append(_md_table(rows) + "\n")
        if stats.get("gap"):
            L.append("## The gap test: the mechanism, isolated\n")
            L.append("Each evaluation prompt is decoded once more with a single displacement: one committed content "
                     "token (the k-th content commit, k uniform over the reference's length, seeded) moves one "
                     "position right and its old position is masked again (the state the shift probe creates). At "
                     "the next step the model's distribution at that gap is recorded: `<slack>` (deleted at the end: "
                     "the lattice's answer, after which the answer can still be right), the displaced token again (a "
                     "duplicate: CE's answer) or anything else; then decoding continues without further "
                     "displacement. \"Undisturbed\" is the same model's exact match on the same examples without "
                     "shift; the loss to one displacement is the paired difference. \"displaced\" is the fraction "
                     "of examples where a displacement could be made (a free right neighbour).\n")
            L.append(gap_markdown(stats["gap"]))
        L.append("## The paper's claims, read from the intervals\n")
        L.append("\n".join(claims(stats)) + "\n")
        control = next((n for n in names if n.endswith("@ms0")), None)
        if control and control in stats["pairs"]:
            d = stats["pairs"][control][rho0]["exact_diff"]
            L.append(f"* **Control**: `{control}` against `{base_name}` on seed(s) "
                     f"{','.join(map(str, stats['pairs'][control]['seeds']))}: exact-match difference {_ci(d)}. The two "
                     f"losses are the same function (tested to float32 rounding in "
                     f"`tests/test_mdlm_objectives.py`); a difference here is float rounding amplified by training.\n")

    if has_tasks:
        L.append(f"## Per task (shift {rho0:g})\n")
        L.append("![per task](per_task.png)\n")
        tasks = sorted(fam[names[0]]["per_task_exact"][rho0])
        rows = [["task"] + [f"`{n}` exact match" for n in names] + ["n"]]
        for task in tasks:
            per = [fam[n]["per_task_exact"][rho0][task] for n in names]
            rows.append([task] + [_ci(x) for x in per] + [str(per[0]["n"])])
        L.append(_md_table(rows) + "\n")

    L.append("## How the CTC settings were chosen\n")
    if ablation:
        own = base_identity(os.path.join(root, "base", "final"), base_summary) if base_summary is not None else None
        L.append(ablation_markdown(ablation, own) + "\n")
    else:
        L.append("No ablation in this run folder. `mdlm-ctc ablate` (same options) fine-tunes every variant of "
                 "`mdlm_ctc/mdlm/ablation.py` from the same base and evaluates it on the validation split (never the "
                 "evaluation set); its table then appears here. The recorded run is in `results/mdlm/ablation.md`.\n")

    L.append("## Training\n")
    L.append("![loss curves](loss_curves.png)\n")
    rows = [["run", "steps", "final loss (last window)", "train time (s)"]]
    if base_summary is not None:
        shipped = " (shipped: not trained in this run)" if base_summary.get("origin") == "shipped" else ""
        rows.append([f"`base` (ce){shipped}", str(base_summary["steps"]),
                     f"{base_summary['final'].get('loss', float('nan')):.4f}", f"{base_summary['train_seconds']:.0f}"])
    for label, by_seed in train_summaries.items():
        for seed, summ in by_seed.items():
            rows.append([f"`{label}` seed {seed}", str(summ["steps"]), f"{summ['final'].get('loss', float('nan')):.4f}",
                         f"{summ['train_seconds']:.0f}"])
    L.append(_md_table(rows) + "\n")
    L.append("CE and CTC losses measure different things (a per-position cross-entropy vs. a sum over alignments); "
             "compare the sampled outputs, not the loss values.\n")

    first = {n: results[n][sorted(results[n])[0]] for n in names}
    L.append(f"## Examples (shift 0, first 8; first seed of each model)\n")
    rows = [["reference"] + [f"`{n}`" for n in names]]
    for i in range(min(8, len(first[names[0]]["fractions"][rho0]["records"]))):
        recs = [first[n]["fractions"][rho0]["records"][i] for n in names]
        rows.append([f"`{recs[0]['reference']}`"] + [f"`{r['prediction']}`" + (" ✓" if r["exact"] else "")
                                                     for r in recs])
    L.append(_md_table(rows) + "\n")

    L.append("## Caveats\n")
    L.append("* A tiny model, toy tasks and a CPU-sized budget: this checks the method and shows the direction and "
             "size of effects on this task family; it does not predict results on real instruction data or 8B "
             "models.\n"
             "* The base and fine-tuning budgets, the learning rates and the task mix were chosen so that the CE "
             "baseline (LLaDA's recipe) learns within a CPU budget; the CTC settings were chosen on the validation "
             "split; both objectives share every other setting.\n"
             "* The shift probe displaces committed content tokens only; at 1-2% few tokens move (realised rates "
             "above), so small drops need many examples to resolve.\n"
             "* A model that is rarely right cannot lose much accuracy under shifts: read drops together with the "
             "starting accuracies.\n"
             "* Float rounding: runs are bitwise reproducible on one machine with one thread count; another thread "
             "count or CPU instruction set rounds differently, so the fine-tunes (and a base trained here) differ in "
             "their bits from another machine's. The default base is shipped with the package, so every machine "
             "fine-tunes from the same weights; its recipe (longer, at a lower peak learning rate than the earlier "
             "1,500 steps at 2e-3, whose bases moved CE's validation exact match by 0.29 with the thread count) was "
             "chosen so that bases differing only in thread count give CE fine-tunes within the seed spread "
             "(`results/mdlm/stability.md`). The fine-tuning seeds measure the variance of the fine-tuning stage.\n")
    L.append("## Files\n")
    L.append("`report.md`, `loss_curves.png`, `shift_robustness.png`" + (", `per_task.png`" if has_tasks else "")
             + ", `summary.json` (all numbers), `eval/<model>.jsonl` (per-example outputs), `base/` (the base "
             "model), `ft/<objective>/seed<k>/` (fine-tuned models, metrics), `config.yaml`.\n")
    path = os.path.join(root, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    return path


def base_provenance(summary: dict) -> str:
    """Where the base came from, its identity and whether its training was interrupted, in words."""
    ident = summary.get("identity") or {}
    sha = ident.get("sha256", "?")
    where = (f"Shipped with the package (`mdlm_ctc/mdlm/assets/base`, built by `python -m mdlm_ctc.mdlm.build_base "
             f"build` with {ident.get('threads', '?')} thread(s) on {ident.get('machine', '?')}, commit "
             f"`{ident.get('commit', '?')}`, torch {ident.get('torch', '?')}), not trained in this run"
             if summary.get("origin") == "shipped" else
             f"Trained in this run with {summary.get('threads', ident.get('threads', '?'))} thread(s)")
    resumed = summary.get("resumed_from") or 0
    interrupted = (f"; its training was resumed at step {resumed} after an interruption (the train time adds up "
                   f"every session)" if resumed else "; trained without interruption")
    return (f"{where}: weights SHA-256 `{sha}`, final training loss "
            f"{(summary.get('final') or {}).get('loss', float('nan')):.4f}{interrupted}.")


def ablation_markdown(ablation: dict, base: dict | None = None) -> str:
    """The ablation table (validation split) and the rule that picked the default; ``base`` is the identity
    of the comparison's own base (``base.base_identity``), to say whether the ablation used it."""
    fractions = ablation["fractions"]
    has_gap = any(v.get("gap") for v in ablation["variants"].values())
    rows = [["variant", "settings", "seeds"] + [f"exact@{f:g}" for f in fractions] + ["drop@0.05",
                                                                                     "exact diff vs ce@0",
                                                                                     "win vs ce@0"]]
    if has_gap:
        rows[0] += ["gap: p(slack)", "gap: written slack / dup", "gap: loss to one displacement"]
    for name, v in ablation["variants"].items():
        fam = v["stats"]
        row = [f"`{name}`" + (" **(default)**" if name == ablation.get("chosen") else ""), v["description"],
               str(len(fam["seeds"]))]
        row += [_ci(fam["metrics"][str(f)]["exact"]) for f in fractions]
        row.append(_ci(fam["drop"]["0.05"]) if "0.05" in fam["drop"] else "-")
        row.append(_ci(v["exact_diff"]) if v.get("exact_diff") else "-")
        row.append(_ci(v["win_rate"]) if v.get("win_rate") else "-")
        if has_gap:
            g = v.get("gap") or {}
            row += [_ci(g["p_slack"]) if g else "-",
                    f"{100 * g['final_slack']['mean']:.0f}% / {100 * g['final_duplicate']['mean']:.0f}%" if g else "-",
                    _ci(g["drop"]) if g and "drop" in g else "-"]
        rows.append(row)
    recorded = ablation.get("base")
    if base is None:
        which = "every variant fine-tuned from one base"
    elif recorded and recorded.get("sha256") == base["sha256"]:
        which = ("every variant fine-tuned from this comparison's base (same weights"
                 + (", the shipped base)" if recorded.get("origin") == "shipped" else ")"))
    elif recorded:
        which = (f"every variant fine-tuned from another base than this comparison's (weights "
                 f"`{recorded['sha256'][:12]}` against `{base['sha256'][:12]}` here; {recorded.get('threads', '?')} "
                 f"thread(s) against {base['threads']}), so its numbers are not this base's")
    else:
        which = "every variant fine-tuned from one base (which one was not recorded)"
    text = [f"Validation split ({ablation['examples']} examples held out from training and evaluation), fine-tuning "
            f"seeds {', '.join(map(str, ablation['seeds']))}, {which} ({ablation['machine']}, commit "
            f"`{ablation.get('commit', '?')}`). Intervals over seeds and examples, as above.\n",
            _md_table(rows) + "\n", f"Rule: {ablation['rule']}.\n"]
    return "\n".join(text)


# ------------------------------------------------------------------------------ README's figures
README_BEGIN = "<!-- compare:begin (generated by python -m mdlm_ctc.mdlm.report --readme results/mdlm/summary.json) -->"
README_END = "<!-- compare:end -->"


def _float_keys(obj):
    """JSON's string keys back to the numbers they were (shift fractions)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            try:
                key = float(k)
            except ValueError:
                key = k
            out[key] = _float_keys(v)
        return out
    if isinstance(obj, list):
        return [_float_keys(v) for v in obj]
    return obj


def readme_section(summary: dict) -> str:
    """README's table and verdict lines, from a comparison's ``summary.json`` (what ``compare`` printed)."""
    stats = _float_keys(summary["stats"])
    info, base, cfg = summary["info"], summary.get("base") or {}, summary["config"]
    t = summary["timings_s"]
    fractions = stats["fractions"]
    rho0 = fractions[0]
    fam, gap = stats["families"], stats.get("gap")
    ident = base.get("identity") or {}
    origin = ("the shipped base" if base.get("origin") == "shipped" else "a base trained in the run") + \
        f", weights SHA-256 `{ident.get('sha256', '?')[:16]}...`"
    seeds = cfg["compare"]["finetune_seeds"].replace(",", ", ")
    from .config import Config

    defaults = Config().to_dict()
    changed = [f"{k}={v}" for sec, values in cfg.items() for k, v in values.items()
               if defaults.get(sec, {}).get(k, v) != v and k not in ("name", "output_dir", "progress", "threads")]
    options = f"options {', '.join(changed)}" if changed else "default options"
    lines = [f"Measured by `mdlm-ctc compare` ({options}) on {info.get('machine', '?')}, "
             f"{info.get('threads', '?')} torch threads, load average {info['load_start'][0]:.1f} at the start and "
             f"{info['load_end'][0]:.1f} at the end (other jobs shared the machine), commit `{info.get('commit', '?')}`; "
             f"fine-tuning seeds {seeds}; {info.get('eval_used')} held-out evaluation examples; {origin}. "
             f"{t['total_s']:.0f} s in all (base {t['base_s']:.0f} s, fine-tuning {t['finetune_s']:.0f} s, evaluation "
             f"{t['eval_s']:.0f} s). Recorded in `results/mdlm/` (`report.md`, `summary.json`).", ""]
    header = ["model", f"exact match, no shift [95% CI]"] + [f"at {100 * f:g}%" for f in fractions[1:]]
    header += [f"drop at {100 * f:g}% [95% CI]" for f in fractions[1:] if abs(f - 0.05) < 1e-12]
    if gap:
        header += ["gap: p(`<slack>`)", "gap: written slack / dup", "gap: loss to one displacement"]
    rows = [header]
    for name, f in fam.items():
        label = {"base": "base (CE)"}.get(name, f"`{name}`" + (" (control)" if name.endswith("@ms0") else ""))
        row = [label + (f", {len(f['seeds'])} seeds" if len(f["seeds"]) > 1 else ""), _ci(f["metrics"][rho0]["exact"])]
        row += [f"{f['metrics'][x]['exact']['mean']:.3f}" for x in fractions[1:]]
        row += [_ci(f["drop"][x]) for x in fractions[1:] if abs(x - 0.05) < 1e-12]
        if gap:
            g = gap["families"].get(name)
            row += [_ci(g["p_slack"]), f"{100 * g['final_slack']['mean']:.0f}% / {100 * g['final_duplicate']['mean']:.0f}%",
                    _ci(g["drop"])] if g else ["-", "-", "-"]
        rows.append(row)
    lines += [_md_table(rows), "", "Read from the intervals, as the report does:", ""]
    lines += claims(stats)
    return "\n".join(lines)


def write_readme(summary_path: str, readme: str) -> bool:
    """Replace README's generated block with :func:`readme_section`; True when the file changed."""
    import json

    with open(summary_path) as f:
        block = readme_section(json.load(f))
    with open(readme) as f:
        text = f.read()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    new = text[:start] + "\n" + block + "\n" + text[end:]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return new != text


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m mdlm_ctc.mdlm.report",
                                     description="README's figures from a comparison's summary.json")
    parser.add_argument("--readme", metavar="SUMMARY_JSON", required=True, help="e.g. results/mdlm/summary.json")
    parser.add_argument("--write", metavar="README_MD", help="replace the generated block of this file (else print)")
    args = parser.parse_args(argv)
    if args.write:
        changed = write_readme(args.readme, args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    else:
        with open(args.readme) as f:
            print(readme_section(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
