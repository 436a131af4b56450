"""Evaluation: per-example metrics, bootstrap intervals, shift robustness and pairwise win rates.

Metrics are computed on token ids after ``sampler.finalize`` (slack deleted, cut at the first EOS),
against the tokenised reference answer:

* ``exact``: the ids are identical;
* ``edit``: token Levenshtein distance divided by ``max(len(prediction), len(reference), 1)`` (in [0, 1]);
* ``length_error``: ``|len(prediction) - len(reference)|``;
* ``slack_rate``: fraction of the raw canvas that is ``<slack>``; ``no_eos``: the canvas has no EOS (nor the
  answer's terminator);
* ``extra_repeats``: the prediction has more adjacent equal tokens than the reference (a token committed
  at two neighbouring positions: the duplication that a repeat-merging collapse would hide).

Aggregates carry percentile-bootstrap intervals over examples (``bootstrap_samples`` resamples,
``confidence`` level, seeded). The **shift-robustness curve** is exact match against the shift fraction
of the sampler's probe, with the drop from the unshifted accuracy and its paired interval. The
**pairwise win rate** of model A against model B counts, per example, a win when A is exact and B is
not, or when neither is exact and A's edit distance is lower (the reverse is a loss, anything else a
tie); win rate = (wins + ties / 2) / n, 0.5 meaning no difference, with a paired bootstrap interval
(Arena-Hard's reporting shape with a programmatic judge).
"""

from __future__ import annotations

import numpy as np

from .sampler import generate


# ------------------------------------------------------------------------------ per-example metrics
def levenshtein(a, b) -> int:
    """Edit distance between two sequences (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def example_metrics(prediction: list[int], reference: list[int], canvas: list[int], slack_id: int,
                    eos_id: int, stop_ids=()) -> dict:
    dist = levenshtein(prediction, reference)

    def adjacent_repeats(seq):
        return sum(a == b for a, b in zip(seq, seq[1:]))

    return {
        "exact": float(prediction == reference),
        "edit": dist / max(len(prediction), len(reference), 1),
        "length_error": float(abs(len(prediction) - len(reference))),
        "slack_rate": sum(t == slack_id for t in canvas) / max(len(canvas), 1),
        "no_eos": float(eos_id not in canvas and not set(stop_ids) & set(canvas)),
        "extra_repeats": float(adjacent_repeats(prediction) > adjacent_repeats(reference)),
    }


# ------------------------------------------------------------------------------ statistics
def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, n, size=(samples, n))


def bootstrap_mean(values, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    means = v[_resamples(v.size, samples, seed)].mean(1)
    alpha = (1 - confidence) / 2
    return {"mean": float(v.mean()), "lo": float(np.quantile(means, alpha)),
            "hi": float(np.quantile(means, 1 - alpha)), "n": int(v.size)}


def pairwise_outcomes(a: list[dict], b: list[dict]) -> np.ndarray:
    """Per example: 1 if A beats B, 0 if B beats A, 0.5 for a tie (see the module docstring)."""
    out = []
    for x, y in zip(a, b, strict=True):
        if x["exact"] != y["exact"]:
            out.append(1.0 if x["exact"] > y["exact"] else 0.0)
        elif not x["exact"] and x["edit"] != y["edit"]:
            out.append(1.0 if x["edit"] < y["edit"] else 0.0)
        else:
            out.append(0.5)
    return np.asarray(out)


def win_rate(a: list[dict], b: list[dict], samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    outcomes = pairwise_outcomes(a, b)
    stats = bootstrap_mean(outcomes, samples, confidence, seed)
    stats.update(wins=int((outcomes == 1).sum()), losses=int((outcomes == 0).sum()), ties=int((outcomes == 0.5).sum()))
    return stats


def paired_difference(a, b, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` (paired per example) with a bootstrap interval."""
    return bootstrap_mean(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), samples, confidence,
                          seed)


# ------------------------------------------------------------------------------ evaluating a model
def encode_eval(examples, tokenizer, cfg) -> tuple[list[list[int]], list[list[int]], list]:
    """(prompt ids, reference answer ids, tasks) of the evaluation examples."""
    from .data import _prompt_ids

    prompts, references, tasks = [], [], []
    limit = cfg.eval.max_eval_examples or len(examples)
    for ex in examples[:limit]:
        prompts.append(_prompt_ids(tokenizer, ex, cfg.data.wrap_chat))
        references.append(list(tokenizer(ex.response, add_special_tokens=False)["input_ids"]))
        tasks.append(ex.task)
    return prompts, references, tasks


def sample_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1)


def summarise(records: list[dict], cfg, seed: int = 0) -> dict:
    s, c = cfg.eval.bootstrap_samples, cfg.eval.confidence
    out = {key: bootstrap_mean([r[key] for r in records], s, c, seed)
           for key in ("exact", "edit", "length_error", "slack_rate", "no_eos", "extra_repeats")}
    committed = sum(r["content_committed"] for r in records)
    out["displaced_fraction"] = sum(r["displaced"] for r in records) / max(committed, 1)
    out["blocked_fraction"] = sum(r["blocked"] for r in records) / max(committed, 1)
    tasks = sorted({r["task"] for r in records if r["task"] is not None})
    out["per_task_exact"] = {t: bootstrap_mean([r["exact"] for r in records if r["task"] == t], s, c, seed)
                             for t in tasks}
    return out


def evaluate_model(model, tokenizer, special, examples, cfg, *, device=None, progress: bool = False,
                   label: str = "model") -> dict:
    """Sample every evaluation prompt at every shift fraction; per-example records and summaries."""
    prompts, references, tasks = encode_eval(examples, tokenizer, cfg)
    seeds = [sample_seed(cfg.run.seed, i) for i in range(len(prompts))]
    result = {"label": label, "fractions": {}}
    for rho in cfg.shift_fraction_list():
        samples = generate(model, prompts, seeds, special, cfg.sample, shift_fraction=rho, device=device,
                           progress=progress, desc=f"eval {label} shift={rho:g}")
        records = []
        for i, smp in enumerate(samples):
            rec = example_metrics(smp.tokens, references[i], smp.canvas, special.slack_id, special.eos_id,
                                  special.stop_ids)
            rec.update(index=i, task=tasks[i], content_committed=smp.content_committed, displaced=smp.displaced,
                       blocked=smp.blocked, prediction=tokenizer.decode(smp.tokens),
                       reference=tokenizer.decode(references[i]))
            records.append(rec)
        result["fractions"][rho] = {"records": records, "summary": summarise(records, cfg, cfg.run.seed)}
    return result


def compare_results(results: dict[str, dict], cfg) -> dict:
    """Pairwise win rates and exact-match differences of every model against the first (the baseline),
    each model's exact-match drop from the first shift fraction (0 by default) to the others, and the
    difference of drops, all with paired bootstrap intervals."""
    names = list(results)
    s, c, seed = cfg.eval.bootstrap_samples, cfg.eval.confidence, cfg.run.seed
    out = {"baseline": names[0], "pairs": {}, "shift_drop": {}}
    fractions = cfg.shift_fraction_list()
    for name in names:
        base = results[name]["fractions"][fractions[0]]["records"]
        out["shift_drop"][name] = {
            rho: paired_difference([r["exact"] for r in base],
                                   [r["exact"] for r in results[name]["fractions"][rho]["records"]], s, c, seed)
            for rho in fractions[1:]}
    for name in names[1:]:
        pair = {}
        for rho in fractions:
            a = results[name]["fractions"][rho]["records"]
            b = results[names[0]]["fractions"][rho]["records"]
            pair[rho] = {"win_rate": win_rate(a, b, s, c, seed),
                         "exact_diff": paired_difference([r["exact"] for r in a], [r["exact"] for r in b], s, c, seed)}
            if rho != fractions[0]:
                # (baseline's drop) - (this model's drop): > 0 means this model loses less under shifts
                a0 = results[name]["fractions"][fractions[0]]["records"]
                b0 = results[names[0]]["fractions"][fractions[0]]["records"]
                pair[rho]["drop_diff"] = paired_difference(
                    [y0["exact"] - y["exact"] for y0, y in zip(b0, b)],
                    [x0["exact"] - x["exact"] for x0, x in zip(a0, a)], s, c, seed)
        out["pairs"][name] = pair
    return out


# ------------------------------------------------------------------------------ across training seeds
METRICS = ("exact", "edit", "length_error", "slack_rate", "no_eos", "extra_repeats")


def crossed_bootstrap(values, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``values[s, n]`` (training seed s, evaluation example n) with a two-way bootstrap interval.

    Each resample draws the training seeds with replacement and, independently, the evaluation
    examples with replacement (seeds and examples are crossed: every seed's model answers every
    example), and takes the mean of the resampled ``[S, N]`` block; the interval is the percentile
    interval of those means. It includes both sources of variance: which models training produced
    and which examples were asked. With one seed it is the ordinary example bootstrap.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    S, N = v.shape
    if N == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "seeds": S, "seed_means": []}
    rng = np.random.RandomState(seed)
    si = rng.randint(0, S, size=(samples, S))
    ei = rng.randint(0, N, size=(samples, N))
    means = v[si[:, :, None], ei[:, None, :]].mean(axis=(1, 2))
    alpha = (1 - confidence) / 2
    return {"mean": float(v.mean()), "lo": float(np.quantile(means, alpha)), "hi": float(np.quantile(means, 1 - alpha)),
            "n": int(N), "seeds": int(S), "seed_means": [float(x) for x in v.mean(axis=1)]}


def _grid(runs: list[dict], rho: float, key: str) -> np.ndarray:
    """``[S, N]`` array of one per-example metric over the seeds of one model family."""
    return np.asarray([[r[key] for r in run["fractions"][rho]["records"]] for run in runs], dtype=np.float64)


def compare_seeded(results: dict[str, dict], fractions: list[float], baseline: str, *, samples: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> dict:
    """Statistics of model families over training seeds and examples (:func:`crossed_bootstrap`).

    ``results[label]`` maps a training seed to that model's :func:`evaluate_model` output; every
    family answers the same examples. For each family: every metric at every shift fraction, and the
    exact-match drop from the first fraction. For each family against ``baseline``, on the seeds both
    have (seed s of one is paired with seed s of the other: same data order and masking noise): the
    exact-match difference, the pairwise win rate and the difference of drops (baseline's minus this
    family's: > 0 means this family loses less accuracy under the shift).
    """
    kw = dict(samples=samples, confidence=confidence, seed=seed)
    rho0 = fractions[0]
    out = {"baseline": baseline, "fractions": fractions, "families": {}, "pairs": {}}
    for label, by_seed in results.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        fam = {"seeds": sorted(by_seed), "metrics": {}, "drop": {}, "per_task_exact": {}}
        for rho in fractions:
            fam["metrics"][rho] = {key: crossed_bootstrap(_grid(runs, rho, key), **kw) for key in METRICS}
            records = runs[0]["fractions"][rho]["records"]
            tasks = sorted({r["task"] for r in records if r["task"] is not None})
            exact = _grid(runs, rho, "exact")
            fam["per_task_exact"][rho] = {
                t: crossed_bootstrap(exact[:, [i for i, r in enumerate(records) if r["task"] == t]], **kw) for t in tasks}
            committed = sum(r["content_committed"] for run in runs for r in run["fractions"][rho]["records"])
            moved = sum(r["displaced"] for run in runs for r in run["fractions"][rho]["records"])
            fam["metrics"][rho]["displaced_fraction"] = moved / max(committed, 1)
        for rho in fractions[1:]:
            fam["drop"][rho] = crossed_bootstrap(_grid(runs, rho0, "exact") - _grid(runs, rho, "exact"), **kw)
        out["families"][label] = fam
    base = results[baseline]
    for label, by_seed in results.items():
        if label == baseline:
            continue
        common = sorted(set(by_seed) & set(base))
        if not common:
            continue
        mine, theirs = [by_seed[s] for s in common], [base[s] for s in common]
        pair = {"seeds": common}
        for rho in fractions:
            a, b = _grid(mine, rho, "exact"), _grid(theirs, rho, "exact")
            outcomes = np.asarray([pairwise_outcomes(x["fractions"][rho]["records"], y["fractions"][rho]["records"])
                                   for x, y in zip(mine, theirs)])
            entry = {"exact_diff": crossed_bootstrap(a - b, **kw), "win_rate": crossed_bootstrap(outcomes, **kw)}
            entry["win_rate"].update(wins=int((outcomes == 1).sum()), losses=int((outcomes == 0).sum()),
                                     ties=int((outcomes == 0.5).sum()))
            if rho != rho0:
                a0, b0 = _grid(mine, rho0, "exact"), _grid(theirs, rho0, "exact")
                entry["drop_diff"] = crossed_bootstrap((b0 - b) - (a0 - a), **kw)
            pair[rho] = entry
        out["pairs"][label] = pair
    return out
