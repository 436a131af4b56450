"""The comparison report: Markdown, PNG plots (matplotlib, Agg backend) and the printed summary table.

The report states what was measured, with intervals, and reads the intervals literally: a difference
whose interval contains 0 is reported as "no significant difference", whichever way the point estimate
leans. Intervals are over evaluation examples only (one training seed), which the report says.
"""

from __future__ import annotations

import os
import platform
import time


def _ci(stat: dict, digits: int = 3, pct: bool = False) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(stat['mean'])} [{f(stat['lo'])}, {f(stat['hi'])}]"


def _verdict(stat: dict, better: str, worse: str) -> str:
    if stat["lo"] > 0:
        return better
    if stat["hi"] < 0:
        return worse
    return "no significant difference"


# ------------------------------------------------------------------------------ plots
def plot_loss_curves(metrics: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = metrics[name]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], color="C0", lw=1.2, label=f"{name} training loss")
        for key, color in (("ce", "C1"), ("ctc", "C2")):
            if name == "ce+ctc" and all(key in r for r in rows):
                ax.plot(steps, [r[key] for r in rows], color=color, lw=0.8, alpha=0.8, label=f"{key} term")
        ax.set_title(f"objective: {name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (normalised, 1/p weighted)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training loss (mean over each logging window); scales differ between objectives", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shift_robustness(results: dict, fractions: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for i, (name, res) in enumerate(results.items()):
        ys = [res["fractions"][f]["summary"]["exact"] for f in fractions]
        mean = [y["mean"] for y in ys]
        err = [[y["mean"] - y["lo"] for y in ys], [y["hi"] - y["mean"] for y in ys]]
        ax.errorbar([f + 0.002 * (i - 0.5) for f in fractions], mean, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel("shift fraction (probability that a committed content token is displaced by one position)")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Shift robustness (95% bootstrap intervals)", fontsize=10)
    ax.xaxis.label.set_size(8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_task(results: dict, fraction: float, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    tasks = sorted(results[names[0]]["fractions"][fraction]["summary"]["per_task_exact"])
    if not tasks:
        return False
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per = results[name]["fractions"][fraction]["summary"]["per_task_exact"]
        mean = [per[t]["mean"] for t in tasks]
        err = [[per[t]["mean"] - per[t]["lo"] for t in tasks], [per[t]["hi"] - per[t]["mean"] for t in tasks]]
        ax.bar([j + i * width for j in range(len(tasks))], mean, width, yerr=err, capsize=2, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.legend()
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
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


# ------------------------------------------------------------------------------ the report
def write_report(root: str, cfg, *, results: dict, comparison: dict, train_summaries: dict,
                 metrics: dict, info: dict, timings: dict) -> str:
    """Write ``report.md`` and the PNGs into ``root``; returns the report path."""
    import torch
    import transformers

    fractions = cfg.shift_fraction_list()
    base = fractions[0]
    names = list(results)
    plot_loss_curves(metrics, os.path.join(root, "loss_curves.png"))
    plot_shift_robustness(results, fractions, os.path.join(root, "shift_robustness.png"))
    has_tasks = plot_per_task(results, base, os.path.join(root, "per_task.png"))
    o, t, s, m = cfg.objective, cfg.train, cfg.sample, cfg.model
    L = []
    L.append(f"# mdlm-ctc comparison: `{cfg.run.name}`\n")
    L.append(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node() or 'unknown host'} "
             f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
             f"{transformers.__version__}). Total wall time {timings.get('total_s', 0):.0f} s "
             f"(" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total_s") + ").\n")
    L.append("## Set-up\n")
    model_desc = (f"embedded tiny bidirectional Llama (`is_causal=False`, hidden {m.tiny_hidden_size}, "
                  f"{m.tiny_layers} layers, {m.tiny_heads} heads, {info.get('parameters', '?'):,} parameters), "
                  f"randomly initialised from seed {cfg.run.seed}" if m.model == "embedded" else f"`{m.model}`")
    L.append(f"* **Model**: {model_desc}; vocabulary {info.get('vocab_size', '?')} tokens.")
    dropped = f", {info['dropped_too_long']} dropped as too long" if info.get("dropped_too_long") else ""
    L.append(f"* **Data**: training {info.get('train_source')} ({info.get('train_rows')} rows used{dropped}); "
             f"evaluation {info.get('eval_source')} ({info.get('eval_used')} examples).")
    L.append(f"* **Matched runs**: every objective starts from the same initial weights, sees the same rows in "
             f"the same order with the same masking noise (t and masked positions per row), for {t.steps} steps "
             f"of {t.batch_size} rows, AdamW lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup steps), "
             f"clip {t.grad_clip:g}, layout `{cfg.data.pad_to}` with max_length {cfg.data.max_length}. Only "
             f"the objective differs.")
    L.append(f"* **Objectives**: `ce` = LLaDA SFT (masked CE / p, EOS padding trained); `ctc` = slack-CTC "
             f"(target = answer + EOS; clean canvas with slack insertion `{o.slack_insertion}`"
             f"{f' rate {o.slack_rate:g}' if o.slack_insertion == 'random' else ''}, slack padding; masked "
             f"positions free, visible ones observed; / p); normalisation `{o.normalization}`"
             f"{f'; ce+ctc weight {o.ctc_weight:g}' if 'ce+ctc' in names else ''}.")
    L.append(f"* **Sampler**: LLaDA low-confidence remasking, gen_length {s.gen_length}, {s.sample_steps} steps, "
             f"block {s.block_length}, temperature {s.temperature:g}, remasking `{s.remasking}`; slack deleted, "
             f"text cut at the first EOS. Shift probe: each committed content token displaced by one position "
             f"({s.shift_direction}) with the given probability.")
    L.append(f"* **Statistics**: {int(cfg.eval.confidence * 100)}% percentile-bootstrap intervals over evaluation "
             f"examples ({cfg.eval.bootstrap_samples} resamples). One training seed: the intervals do not "
             f"include training-seed variance.\n")

    L.append(f"## Results without shift (shift fraction {base:g})\n")
    rows = [["objective", "exact match", "normalised edit distance", "length error (tokens)", "slack rate",
             "no-EOS rate", "extra adjacent repeats"]]
    for name in names:
        sm = results[name]["fractions"][base]["summary"]
        rows.append([f"`{name}`", _ci(sm["exact"]), _ci(sm["edit"]), _ci(sm["length_error"], 2),
                     f"{sm['slack_rate']['mean']:.3f}", f"{sm['no_eos']['mean']:.3f}", _ci(sm["extra_repeats"])])
    L.append(_md_table(rows) + "\n")
    L.append("Extra adjacent repeats = share of predictions with more adjacent equal tokens than the reference "
             "(one token committed at two neighbouring positions).\n")

    L.append("## Shift robustness\n")
    L.append("![shift robustness](shift_robustness.png)\n")
    rows = [["shift fraction"] + [f"`{n}` exact match" for n in names] + [f"`{n}` displaced / blocked" for n in names]]
    for f in fractions:
        row = [f"{f:g}"] + [_ci(results[n]["fractions"][f]["summary"]["exact"]) for n in names]
        row += [f"{results[n]['fractions'][f]['summary']['displaced_fraction']:.3f} / "
                f"{results[n]['fractions'][f]['summary']['blocked_fraction']:.3f}" for n in names]
        rows.append(row)
    L.append(_md_table(rows) + "\n")
    if len(fractions) > 1:
        rows = [["shift fraction"] + [f"`{n}` exact-match drop" for n in names]]
        for f in fractions[1:]:
            rows.append([f"{f:g}"] + [_ci(comparison["shift_drop"][n][f]) for n in names])
        L.append("Drop = exact match at shift 0 minus exact match at the given shift (paired per example):\n")
        L.append(_md_table(rows) + "\n")

    if comparison["pairs"]:
        b = comparison["baseline"]
        L.append(f"## Pairwise comparison against `{b}`\n")
        L.append("Win rate: per example, win = exact while the baseline is not, or lower edit distance when "
                 "neither is exact; ties count one half; 0.5 = no difference.\n")
        rows = [["objective", "shift", "win rate", "wins / losses / ties", "exact-match difference",
                 "drop difference (baseline drop - this drop)"]]
        verdicts = []
        for name, pair in comparison["pairs"].items():
            for f in fractions:
                p = pair[f]
                wr = p["win_rate"]
                rows.append([f"`{name}`", f"{f:g}", _ci(wr), f"{wr['wins']} / {wr['losses']} / {wr['ties']}",
                             _ci(p["exact_diff"]), _ci(p["drop_diff"]) if "drop_diff" in p else "-"])
            p0 = pair[base]
            verdicts.append(
                f"* `{name}` vs `{b}` without shift: exact-match difference {_ci(p0['exact_diff'])} -> "
                f"{_verdict(p0['exact_diff'], f'`{name}` better', f'`{b}` better')}; win rate "
                f"{_ci(p0['win_rate'])}.")
            base_a = results[name]["fractions"][base]["summary"]["exact"]["mean"]
            base_b = results[b]["fractions"][base]["summary"]["exact"]["mean"]
            for f in fractions[1:]:
                d = pair[f]["drop_diff"]
                less, more = f"`{name}` loses less accuracy than `{b}`", f"`{name}` loses more accuracy than `{b}`"
                rel_a = comparison["shift_drop"][name][f]["mean"] / base_a if base_a > 0 else float("nan")
                rel_b = comparison["shift_drop"][b][f]["mean"] / base_b if base_b > 0 else float("nan")
                note = ""
                if p0["exact_diff"]["hi"] < 0 or p0["exact_diff"]["lo"] > 0:
                    note = (f" The two start from different accuracies, so absolute drops partly reflect the "
                            f"starting point (relative drops: `{name}` {100 * rel_a:.0f}%, `{b}` {100 * rel_b:.0f}%).")
                verdicts.append(f"* shift {f:g}: difference of drops {_ci(d)} -> {_verdict(d, less, more)}.{note}")
        L.append(_md_table(rows) + "\n")
        L.append("### What the intervals say\n")
        L.append("\n".join(verdicts) + "\n")

    if has_tasks:
        L.append(f"## Per task (shift {base:g})\n")
        L.append("![per task](per_task.png)\n")
        tasks = sorted(results[names[0]]["fractions"][base]["summary"]["per_task_exact"])
        rows = [["task"] + [f"`{n}` exact match" for n in names] + ["n"]]
        for task in tasks:
            per = [results[n]["fractions"][base]["summary"]["per_task_exact"][task] for n in names]
            rows.append([task] + [_ci(x) for x in per] + [str(per[0]["n"])])
        L.append(_md_table(rows) + "\n")

    L.append("## Training\n")
    L.append("![loss curves](loss_curves.png)\n")
    rows = [["objective", "steps", "final loss (last window)", "train time (s)", "metrics"]]
    for name, summ in train_summaries.items():
        rows.append([f"`{name}`", str(summ["steps"]), f"{summ['final'].get('loss', float('nan')):.4f}",
                     f"{summ['train_seconds']:.0f}", f"`{name}/metrics.jsonl`"])
    L.append(_md_table(rows) + "\n")
    L.append("The CE and CTC losses measure different things (a per-position cross-entropy vs. a sum over "
             "alignments), so their values are not comparable with each other; compare the sampled outputs.\n")

    L.append("## Examples (shift 0, first 8)\n")
    rows = [["reference"] + [f"`{n}`" for n in names]]
    for i in range(min(8, len(results[names[0]]["fractions"][base]["records"]))):
        recs = [results[n]["fractions"][base]["records"][i] for n in names]
        rows.append([f"`{recs[0]['reference']}`"] + [f"`{r['prediction']}`" + (" ✓" if r["exact"] else "")
                                                     for r in recs])
    L.append(_md_table(rows) + "\n")

    L.append("## Caveats\n")
    L.append("* A tiny model, toy tasks, one training seed and a CPU-sized budget: this checks the pipeline and "
             "shows the direction and size of effects on this task family; it does not predict results on "
             "real instruction data.\n"
             "* The embedded tasks are not tuned toward either objective. Their fixed-width input fields, the step "
             "count and the learning rate of the default were chosen so that the CE baseline (LLaDA's recipe) "
             "learns something within a CPU budget, looking at CE only; both runs share every hyper-parameter.\n"
             "* The shift probe displaces committed content tokens only; its realised rate is in the table.\n"
             "* A model that is rarely right cannot lose much accuracy under shifts: read the drop differences "
             "together with the starting accuracies (relative drops are given above).\n")
    L.append("## Files\n")
    L.append("`report.md`, `loss_curves.png`, `shift_robustness.png`" + (", `per_task.png`" if has_tasks else "")
             + ", `summary.json` (all numbers), `eval/<objective>.jsonl` (per-example outputs), "
             "`<objective>/metrics.jsonl`, `<objective>/final/` (model), `config.yaml`.\n")
    path = os.path.join(root, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    return path
