"""The main job's protocol without training: seeds-and-examples statistics, the claims, the ablation rule,
the validation split and run reuse."""

import pytest

np = pytest.importorskip("numpy")  # without numpy this file is skipped, not a collection error (`pytest -m gpu`)

from mdlm_ctc.mdlm.evaluate import bootstrap_mean, compare_seeded, crossed_bootstrap  # noqa: E402


def _result(exact_by_fraction: dict, edit=None, task="copy"):
    """An ``evaluate_model``-shaped result from per-example exact-match lists."""
    fractions = {}
    for rho, exact in exact_by_fraction.items():
        records = [{"exact": float(e), "edit": 0.0 if e else (edit if edit is not None else 0.5), "length_error": 0.0,
                    "slack_rate": 0.0, "no_eos": 0.0, "extra_repeats": 0.0, "task": task if i % 2 else "reverse",
                    "content_committed": 4, "displaced": int(rho * 4), "blocked": 0} for i, e in enumerate(exact)]
        fractions[rho] = {"records": records}
    return {"fractions": fractions}


def test_crossed_bootstrap_with_one_seed_is_the_example_bootstrap():
    values = np.random.RandomState(0).rand(200) < 0.4
    one = crossed_bootstrap(values[None, :].astype(float), samples=2000, seed=3)
    ref = bootstrap_mean(values.astype(float), samples=2000, seed=3)
    assert one["mean"] == pytest.approx(ref["mean"])
    assert one["lo"] == pytest.approx(ref["lo"], abs=0.02) and one["hi"] == pytest.approx(ref["hi"], abs=0.02)
    assert one["seeds"] == 1 and one["n"] == 200


def test_crossed_bootstrap_includes_seed_variance():
    rng = np.random.RandomState(1)
    same = np.tile((rng.rand(300) < 0.5).astype(float), (3, 1))
    # three seeds whose models differ a lot: 0.2, 0.5 and 0.8 exact match on the same examples
    spread = np.stack([(rng.rand(300) < p).astype(float) for p in (0.2, 0.5, 0.8)])
    narrow = crossed_bootstrap(same, samples=1000)
    wide = crossed_bootstrap(spread, samples=1000)
    assert wide["hi"] - wide["lo"] > 3 * (narrow["hi"] - narrow["lo"])
    assert wide["seed_means"] == pytest.approx(list(spread.mean(1)))
    constant = crossed_bootstrap(np.ones((3, 10)), samples=100)
    assert constant["lo"] == constant["hi"] == 1.0


def test_compare_seeded_pairs_seeds_and_examples():
    n = 120
    ce_exact = np.arange(n) % 2 == 0                     # 0.5 without shift
    ce_shift = ce_exact & (np.arange(n) % 4 == 0)        # loses half of it at 0.05
    ctc_exact = ce_exact | (np.arange(n) % 6 == 1)       # better, and never loses under the shift
    results = {
        "ce": {s: _result({0.0: ce_exact, 0.05: ce_shift}) for s in (1, 2, 3)},
        "ctc": {s: _result({0.0: ctc_exact, 0.05: ctc_exact}) for s in (1, 2, 3)},
        "ctc@ms0": {1: _result({0.0: ce_exact, 0.05: ce_shift})},
        "base": {0: _result({0.0: ce_shift, 0.05: ce_shift})},
    }
    stats = compare_seeded(results, [0.0, 0.05], "ce", samples=300)
    fam = stats["families"]
    assert fam["ce"]["metrics"][0.0]["exact"]["mean"] == pytest.approx(0.5)
    assert fam["ce"]["drop"][0.05]["mean"] == pytest.approx(0.25)
    assert fam["ctc"]["drop"][0.05]["mean"] == 0.0 and fam["ctc"]["drop"][0.05]["hi"] == 0.0
    pair = stats["pairs"]["ctc"]
    assert pair["seeds"] == [1, 2, 3]
    assert pair[0.0]["exact_diff"]["mean"] == pytest.approx(ctc_exact.mean() - 0.5)
    assert pair[0.05]["drop_diff"]["mean"] == pytest.approx(0.25) and pair[0.05]["drop_diff"]["lo"] > 0
    assert pair[0.0]["win_rate"]["mean"] > 0.5 and pair[0.0]["win_rate"]["losses"] == 0
    control = stats["pairs"]["ctc@ms0"]
    assert control["seeds"] == [1]  # paired with ce's seed 1 only
    assert control[0.0]["exact_diff"]["mean"] == 0.0 and control[0.0]["win_rate"]["mean"] == 0.5
    assert "base" not in stats["pairs"]  # no seed in common with the fine-tunes
    assert set(fam["ce"]["per_task_exact"][0.0]) == {"copy", "reverse"}
    assert fam["ce"]["metrics"][0.05]["displaced_fraction"] == 0.0  # int(0.05 * 4) displaced of 4


def test_claims_read_the_intervals():
    from mdlm_ctc.mdlm.report import claims

    n = 400
    idx = np.arange(n)
    ce = idx % 2 == 0
    ce_1 = ce & (idx % 20 != 0)          # loses 0.05 at 1%
    ce_5 = ce & (idx % 4 == 0)           # loses 0.25 at 5%
    good = {s: _result({0.0: ce, 0.01: ce, 0.05: ce}) for s in (1, 2, 3)}
    results = {"ce": {s: _result({0.0: ce, 0.01: ce_1, 0.05: ce_5}) for s in (1, 2, 3)}, "ctc": good}
    lines = claims(compare_seeded(results, [0.0, 0.01, 0.05], "ce", samples=300))
    assert "Claim 1" in lines[0] and "supported: the interval of the drop excludes 0" in lines[0]
    assert "Claim 2" in lines[1] and "matches" in lines[1] and "loses less" in lines[1]
    assert "accuracy met" in lines[2] and "drop met" in lines[2]
    # a CTC model that is far worse: claim 2 fails, the goal is not met
    bad = ce & (idx % 8 == 0)
    results["ctc"] = {s: _result({0.0: bad, 0.01: bad, 0.05: bad}) for s in (1, 2, 3)}
    lines = claims(compare_seeded(results, [0.0, 0.01, 0.05], "ce", samples=300))
    assert "is worse than" in lines[1] and "accuracy not met" in lines[2]
    # no drop at all for CE: claim 1 is not supported
    flat = {"ce": {s: _result({0.0: ce, 0.01: ce}) for s in (1, 2)}}
    lines = claims(compare_seeded(flat, [0.0, 0.01], "ce", samples=100))
    assert "not supported at this sample size" in lines[0]


def test_ablation_rule_picks_on_validation_numbers():
    from mdlm_ctc.mdlm import ablation as A

    n = 200
    idx = np.arange(n)
    ce = idx % 2 == 0

    def fam(exact0, exact5):
        return {s: _result({0.0: exact0, 0.05: exact5}) for s in (1, 2)}

    results = {"ce": fam(ce, ce & (idx % 4 == 0)),
               "eos-b1": fam(ce, ce & (idx % 8 != 0)),                  # same accuracy, small drop
               "eos-b2": fam(ce, ce),                                    # same accuracy, no drop: chosen
               "slack-canvas": fam(ce & (idx % 4 == 0), ce & (idx % 4 == 0)),  # no drop but far worse
               "ce-on-shift10": fam(ce, ce)}                            # a CE control is never chosen
    stats = compare_seeded(results, [0.0, 0.05], "ce", samples=100)
    assert A.choose(stats, list(results)) == "eos-b2"
    del results["eos-b2"], results["eos-b1"]
    stats = compare_seeded(results, [0.0, 0.05], "ce", samples=100)
    assert A.choose(stats, list(results)) == "slack-canvas"  # none qualifies: the most accurate CTC variant


def test_ablation_variants_are_valid_settings():
    from mdlm_ctc.mdlm import ablation as A
    from mdlm_ctc.mdlm.compare import finetune_config
    from mdlm_ctc.mdlm.config import Config

    cfg = Config()
    for name, v in A.VARIANTS.items():
        run = finetune_config(cfg, v.objective, 1, v.overrides, "somewhere")
        assert run.objective.objective == v.objective and v.description
        for key, value in v.overrides.items():
            assert getattr(run.objective, key) == value
        Config.from_dict(v.sample)  # valid sampler options
        if v.reuses:  # an evaluation-only row trains exactly like the row it reuses
            assert (A.VARIANTS[v.reuses].objective, A.VARIANTS[v.reuses].overrides) == (v.objective, v.overrides)
    assert A.variant_names(Config.from_dict({"variants": "eos-b2"})) == ["ce", "eos-b2"]
    assert A.variant_names(Config.from_dict({"variants": "eos-b2-probe30+budget"})) == [
        "ce", "eos-b2-probe30", "eos-b2-probe30+budget"]
    with pytest.raises(ValueError, match="variants"):
        A.variant_names(Config.from_dict({"variants": "nope"}))


def test_the_default_is_a_variant_of_the_ablation():
    """The shipped CTC default must be one of the measured variants (chosen on validation)."""
    from mdlm_ctc.mdlm import ablation as A
    from mdlm_ctc.mdlm.config import Config

    obj = Config().objective
    matches = [name for name, v in A.VARIANTS.items()
               if v.objective == "ctc" and all(getattr(obj, k) == x for k, x in v.overrides.items())]
    assert matches, "the default CTC settings are not among the ablation's variants"


def test_validation_split_is_disjoint_from_training_and_evaluation():
    pytest.importorskip("transformers")
    from mdlm_ctc.mdlm.config import Config
    from mdlm_ctc.mdlm.data import load_datasets, load_validation

    cfg = Config.from_dict({"synthetic_train_size": 300, "synthetic_eval_size": 40, "synthetic_val_size": 40,
                            "synthetic_max_len": 6})
    train, evals, _ = load_datasets(cfg)
    val, source = load_validation(cfg, train, evals)
    assert len(val) == 40 and "held out" in source
    prompts = {ex.prompt for ex in val}
    assert not prompts & {ex.prompt for ex in train} and not prompts & {ex.prompt for ex in evals}
    assert len(prompts) == 40
    again, _ = load_validation(cfg, train, evals)
    assert [ex.prompt for ex in again] == [ex.prompt for ex in val]


def test_recorded_settings_survive_new_options_but_not_changed_ones():
    from mdlm_ctc.mdlm.compare import same_settings, settings_of
    from mdlm_ctc.mdlm.config import Config

    cfg = Config.from_dict({"objective": "ce"})
    recorded = settings_of(cfg)
    assert same_settings(recorded, settings_of(cfg))
    older = {section: dict(values) for section, values in recorded.items()}
    del older["train"]["grad_clip"]  # a run recorded before an option existed
    assert same_settings(older, settings_of(cfg))
    changed = Config.from_dict({"objective": "ce", "lr": cfg.train.lr * 2})
    assert not same_settings(recorded, settings_of(changed))
    # what does not change a trained model does not count: evaluation sizes, names, and CTC options for CE
    other = Config.from_dict({"objective": "ce", "synthetic_eval_size": 7, "name": "x", "threads": 1,
                              "slack_budget": 5})
    assert same_settings(recorded, settings_of(other))
    ctc = Config.from_dict({"objective": "ctc"})
    assert not same_settings(settings_of(ctc), settings_of(Config.from_dict({"objective": "ctc", "slack_budget": 5})))


def test_a_run_folder_is_used_by_one_job_at_a_time(tmp_path):
    from mdlm_ctc.mdlm.compare import run_folder_lock

    with run_folder_lock(str(tmp_path)):
        with pytest.raises(ValueError, match="in use by another"):
            with run_folder_lock(str(tmp_path)):
                pass
    with run_folder_lock(str(tmp_path)):  # released
        pass
