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

**The gap test** (:func:`gap_test`) isolates the mechanism the paper relies on. Each evaluation prompt is
decoded once with a single displacement (``sampler``'s ``probe``): one committed content token (the k-th
content commit, k uniform over the reference's length, seeded per example) is moved one position right
and its old position masked again. At the next forward pass the sampler records the model's
distribution at that gap: the probability of ``<slack>`` (deleted at the end: a model that learned the
lattice answers the displacement this way, and the answer can still be right), of the displaced token
(writing it again is a duplicate, what a position-wise CE model does) and of anything else; decoding then
continues, and the token finally committed at the gap and the exact match are recorded. With greedy
sampling, decoding up to the displacement is the undisturbed one, so the undisturbed exact match of the
same example (shift fraction 0) pairs with it: their difference is the cost of one displacement.

**Power.** :func:`detectable_difference` turns an interval into the smallest true difference the design
detects with 80% power: (z_{1-a/2} + z_{0.8}) x SE, with SE = the interval's width / (2 z_{1-a/2}) (a
two-sided test at the interval's level, a normal sampling distribution, the same spread under the
alternative).
"""

from __future__ import annotations

import random
import warnings
from statistics import NormalDist

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
def detectable_difference(stat: dict, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference detected with probability ``power`` by a two-sided test at level
    ``1 - confidence``, from the interval ``stat`` (``lo``, ``hi``) of an estimated difference (see the module
    docstring for the assumptions)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    se = (stat["hi"] - stat["lo"]) / (2 * z)
    return float((z + NormalDist().inv_cdf(power)) * se)


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


# ------------------------------------------------------------------------------ the gap test
GAP_KINDS = ("slack", "duplicate", "eos", "other")
GAP_METRICS = ("p_slack", "p_duplicate", "p_other", "exact_after", "exact_before", "drop") + \
    tuple(f"top_{k}" for k in GAP_KINDS) + tuple(f"final_{k}" for k in GAP_KINDS)


def probe_indices(references: list[list[int]], seed: int) -> list[int]:
    """Per example, the content commit the gap test displaces: uniform over the reference's length (seeded)."""
    return [random.Random(sample_seed(seed, i) + 104_729).randrange(max(len(ref), 1))
            for i, ref in enumerate(references)]


def _gap_kind(token: int, gap: dict, special) -> str:
    if token == special.slack_id:
        return "slack"
    if token == gap["token"]:
        return "duplicate"
    return "eos" if token == special.eos_id else "other"


def gap_test(model, tokenizer, special, examples, cfg, *, device=None, progress: bool = False,
             label: str = "model") -> dict:
    """Decode every prompt with one displacement and record the model's answer to the gap (module docstring)."""
    prompts, references, tasks = encode_eval(examples, tokenizer, cfg)
    seeds = [sample_seed(cfg.run.seed, i) for i in range(len(prompts))]
    samples = generate(model, prompts, seeds, special, cfg.sample, device=device, progress=progress,
                       desc=f"gap test {label}", probe=probe_indices(references, cfg.run.seed))
    nan = float("nan")
    records = []
    for i, smp in enumerate(samples):
        rec = {"index": i, "task": tasks[i], "placed": smp.gap is not None, "exact_after": float(smp.tokens == references[i]),
               "blocked": smp.blocked, "prediction": tokenizer.decode(smp.tokens),
               "reference": tokenizer.decode(references[i])}
        if smp.gap is None:
            rec.update(p_slack=nan, p_duplicate=nan, p_other=nan, top=None, final=None)
        else:
            g = smp.gap
            rec.update(p_slack=g["p_slack"], p_duplicate=g["p_duplicate"], p_other=g["p_other"],
                       top=_gap_kind(g["top"], g, special), final=_gap_kind(g["final"], g, special),
                       position=g["position"], token=tokenizer.convert_ids_to_tokens(g["token"]))
        records.append(rec)
    return {"label": label, "records": records}


def _gap_grid(gap_runs: list[dict], plain_runs: list[dict] | None, rho0, key: str) -> np.ndarray:
    """``[S, N]`` of one gap-test metric; NaN where no displacement could be made."""
    rows = []
    for s, run in enumerate(gap_runs):
        row = []
        for i, r in enumerate(run["records"]):
            if not r["placed"]:
                row.append(np.nan)
                continue
            before = plain_runs[s]["fractions"][rho0]["records"][i]["exact"] if plain_runs is not None else np.nan
            if key == "exact_before":
                row.append(before)
            elif key == "drop":
                row.append(before - r["exact_after"])
            elif key.startswith(("top_", "final_")):
                where, kind = key.split("_", 1)
                row.append(float(r[where] == kind))
            else:
                row.append(r[key])
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def gap_stats(gap_results: dict[str, dict], results: dict[str, dict], rho0: float, baseline: str, *,
              samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The gap test's statistics over seeds and examples (:func:`crossed_bootstrap`, NaN-aware).

    ``gap_results[label][seed]`` is :func:`gap_test`'s output, ``results[label][seed]`` the same model's
    :func:`evaluate_model` output (its undisturbed decoding at ``rho0``). Per family: every metric of
    :data:`GAP_METRICS` over the examples where a displacement was made, and the fraction where it was.
    Against ``baseline`` (paired seeds and examples): the differences of ``p_slack`` and ``exact_after``
    (this family's minus the baseline's) and ``drop_diff`` (the baseline's drop minus this family's: > 0
    means this family loses less to one displacement).
    """
    kw = dict(samples=samples, confidence=confidence, seed=seed)
    out = {"baseline": baseline, "families": {}, "pairs": {}}
    for label, by_seed in gap_results.items():
        seeds = sorted(by_seed)
        gaps = [by_seed[s] for s in seeds]
        plain = [results[label][s] for s in seeds] if label in results else None
        placed = np.asarray([[float(r["placed"]) for r in run["records"]] for run in gaps])
        fam = {"seeds": seeds, "placed": crossed_bootstrap(placed, **kw)}
        for key in GAP_METRICS:
            if plain is None and key in ("exact_before", "drop"):
                continue
            fam[key] = crossed_bootstrap(_gap_grid(gaps, plain, rho0, key), **kw)
        out["families"][label] = fam
    if baseline not in gap_results:
        return out
    base = gap_results[baseline]
    for label, by_seed in gap_results.items():
        common = sorted(set(by_seed) & set(base))
        if label == baseline or not common:
            continue
        pair = {"seeds": common}
        for key, name in (("p_slack", "p_slack"), ("exact_after", "exact_after"), ("drop", "drop_diff")):
            a = _gap_grid([by_seed[s] for s in common], [results[label][s] for s in common], rho0, key)
            b = _gap_grid([base[s] for s in common], [results[baseline][s] for s in common], rho0, key)
            pair[name] = crossed_bootstrap(b - a if key == "drop" else a - b, **kw)
            pair[name]["detectable"] = detectable_difference(pair[name], confidence)
        out["pairs"][label] = pair
    return out


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
    if N == 0 or np.isnan(v).all():
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "seeds": S,
                "seed_means": [float("nan")] * S}
    rng = np.random.RandomState(seed)
    si = rng.randint(0, S, size=(samples, S))
    ei = rng.randint(0, N, size=(samples, N))
    alpha = (1 - confidence) / 2
    if np.isnan(v).any():  # NaN marks a missing cell (e.g. no displacement possible): means over the others
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(v[si[:, :, None], ei[:, None, :]], axis=(1, 2))
            means = means[np.isfinite(means)]
            seed_means = np.nanmean(v, axis=1)
        return {"mean": float(np.nanmean(v)), "lo": float(np.quantile(means, alpha)),
                "hi": float(np.quantile(means, 1 - alpha)), "n": int(np.isfinite(v).sum(axis=1).max()), "seeds": int(S),
                "seed_means": [float(x) for x in seed_means]}
    means = v[si[:, :, None], ei[:, None, :]].mean(axis=(1, 2))
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
            entry["exact_diff"]["detectable"] = detectable_difference(entry["exact_diff"], confidence)
            entry["win_rate"].update(wins=int((outcomes == 1).sum()), losses=int((outcomes == 0).sum()),
                                     ties=int((outcomes == 0.5).sum()))
            if rho != rho0:
                a0, b0 = _grid(mine, rho0, "exact"), _grid(theirs, rho0, "exact")
                entry["drop_diff"] = crossed_bootstrap((b0 - b) - (a0 - a), **kw)
                entry["drop_diff"]["detectable"] = detectable_difference(entry["drop_diff"], confidence)
            pair[rho] = entry
        out["pairs"][label] = pair
    return out
