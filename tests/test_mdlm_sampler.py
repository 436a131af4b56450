"""The LLaDA sampler, the positional-shift probe, and the evaluation metrics on hand-made cases."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from mdlm_ctc.mdlm import model as M  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.evaluate import (bootstrap_mean, example_metrics, levenshtein,  # noqa: E402
                                    pairwise_outcomes,
                                    paired_difference, win_rate)
from mdlm_ctc.mdlm.sampler import _schedule, finalize, generate, generate_group  # noqa: E402

SPECIAL = M.SpecialIds(mask_id=2, eos_id=1, slack_id=3, pad_id=0)
V = 20


class TableModel(torch.nn.Module):
    """Predicts token ``table[j]`` at canvas position ``j`` whatever the input, with confidence falling in j."""

    def __init__(self, prompt_length, table):
        super().__init__()
        self.prompt_length = prompt_length
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, input_ids, want="logits"):
        self.calls += 1
        B, L = input_ids.shape
        logits = torch.zeros(B, L, V)
        for j, tok in enumerate(self.table):
            logits[:, self.prompt_length + j, tok] = 10.0 - j  # earlier positions are more confident
        return logits


def _cfg(**kw):
    base = dict(gen_length=4, block_length=4, sample_steps=4, temperature=0.0)
    base.update(kw)
    return Config.from_dict(base).sample


def test_schedule_is_llada_get_num_transfer_tokens():
    assert _schedule(torch.tensor([10, 3, 0]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_finalize_deletes_slack_cuts_at_eos_keeps_repeats():
    assert finalize([5, 3, 0, 0, 3, 0, 1, 7, 1], slack_id=3, eos_id=1) == [5, 0, 0, 0]
    assert finalize([3, 3, 3], slack_id=3, eos_id=1) == []
    assert finalize([6, 2, 6], slack_id=3, eos_id=1, mask_id=2) == [6, 6]


def test_low_confidence_remasking_commits_most_confident_first():
    model = TableModel(2, [10, 11, 12, 13])
    prompts = torch.tensor([[5, 6]])
    out = generate_group(model, prompts, [torch.Generator().manual_seed(0)], SPECIAL, _cfg())
    assert out[0].canvas == [10, 11, 12, 13] and out[0].tokens == [10, 11, 12, 13]
    assert model.calls == 4  # one forward per step
    blocks = generate_group(TableModel(2, [10, 11, 1, 3]), prompts, [torch.Generator()], SPECIAL,
                            _cfg(block_length=2, sample_steps=2))
    assert blocks[0].canvas == [10, 11, 1, 3] and blocks[0].tokens == [10, 11]


def test_shift_probe_displaces_committed_tokens_by_one_position():
    # step 1 commits 10 at 0 -> moved to 1; step 2 re-commits 10 at 0 (neighbour taken: blocked);
    # step 3 commits 12 at 2 -> moved to 3; step 4 re-commits 12 at 2 (blocked)
    model = TableModel(2, [10, 11, 12, 13])
    out = generate_group(model, torch.tensor([[5, 6]]), [torch.Generator().manual_seed(0)], SPECIAL, _cfg(),
                         shift_fraction=1.0)[0]
    assert out.canvas == [10, 10, 12, 12]
    assert (out.content_committed, out.displaced, out.blocked) == (4, 2, 2)
    left = generate_group(TableModel(2, [10, 11, 12, 13]), torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL,
                          _cfg(shift_direction="left"), shift_fraction=1.0)[0]
    assert 2 not in left.canvas and left.blocked >= 1  # position -1 is the prompt: blocked
    # slack and EOS are never displaced
    quiet = generate_group(TableModel(2, [3, 3, 1, 1]), torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL, _cfg(),
                           shift_fraction=1.0)[0]
    assert (quiet.content_committed, quiet.displaced, quiet.canvas) == (0, 0, [3, 3, 1, 1])


def test_shift_fraction_zero_moves_nothing():
    out = generate_group(TableModel(1, [10, 11, 12, 13]), torch.tensor([[5]]), [torch.Generator()], SPECIAL, _cfg(),
                         shift_fraction=0.0)[0]
    assert out.canvas == [10, 11, 12, 13] and out.displaced == 0 and out.content_committed == 4


def test_sampler_slack_budget_and_eos_fill():
    slacky = TableModel(2, [3, 3, 3, 3])
    prompts = torch.tensor([[5, 6]])
    free = generate_group(slacky, prompts, [torch.Generator()], SPECIAL, _cfg())[0]
    assert free.canvas == [3, 3, 3, 3]
    capped = generate_group(slacky, prompts, [torch.Generator()], SPECIAL, _cfg(sample_slack_budget=1))[0]
    assert capped.canvas.count(3) == 1 and capped.canvas[0] == 3  # then slack is no longer a candidate
    none = generate_group(slacky, prompts, [torch.Generator()], SPECIAL, _cfg(sample_slack_budget=0))[0]
    assert 3 not in none.canvas
    ending = TableModel(2, [10, 1, 12, 13])
    plain = generate_group(ending, prompts, [torch.Generator()], SPECIAL, _cfg())[0]
    assert plain.canvas == [10, 1, 12, 13] and plain.tokens == [10]
    filled = generate_group(ending, prompts, [torch.Generator()], SPECIAL, _cfg(eos_fill=True))[0]
    assert filled.canvas == [10, 1, 1, 1] and filled.tokens == [10]


@pytest.fixture(scope="module")
def tiny():
    cfg = Config.from_dict({"tiny_hidden_size": 32, "tiny_layers": 2, "tiny_intermediate_size": 64})
    hf = M.build_embedded_model(cfg, V, 32, seed=0)
    return M.DiffusionLM(hf)


@pytest.mark.parametrize("temperature,shift", [(0.0, 0.0), (1.0, 0.0), (1.0, 0.3), (0.0, 0.3)])
def test_seeded_sampling_is_deterministic(tiny, temperature, shift):
    cfg = _cfg(gen_length=8, block_length=4, sample_steps=4, temperature=temperature, shift_direction="random")
    prompts = [[5, 6, 7], [8, 9], [5, 5, 5], [10, 11]]
    a = generate(tiny, prompts, [1, 2, 3, 4], SPECIAL, cfg, shift_fraction=shift)
    b = generate(tiny, prompts, [1, 2, 3, 4], SPECIAL, cfg, shift_fraction=shift)
    assert [r.canvas for r in a] == [r.canvas for r in b]
    assert all(2 not in r.canvas and len(r.canvas) == 8 for r in a)  # nothing left masked
    if temperature > 0:
        c = generate(tiny, prompts, [101, 102, 103, 104], SPECIAL, cfg, shift_fraction=shift)
        assert [r.canvas for r in a] != [r.canvas for r in c]


def test_levenshtein_hand_cases():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein([], [1, 2]) == 2 and levenshtein([1, 2, 3], [1, 2, 3]) == 0
    assert levenshtein([1, 0, 0, 0], [1, 0, 0]) == 1


def test_example_metrics_hand_cases():
    m = example_metrics([4, 5], [4, 5], canvas=[4, 3, 5, 1, 3], slack_id=3, eos_id=1)
    assert m == {"exact": 1.0, "edit": 0.0, "length_error": 0.0, "slack_rate": 0.4, "no_eos": 0.0,
                 "extra_repeats": 0.0}
    assert example_metrics([4, 4, 5], [4, 5], [1], 3, 1)["extra_repeats"] == 1.0
    assert example_metrics([1, 0, 0, 0], [1, 0, 0, 0], [1], 3, 1)["extra_repeats"] == 0.0
    m = example_metrics([4, 6, 5], [4, 5], canvas=[4, 6, 5, 9], slack_id=3, eos_id=1)
    assert m["exact"] == 0.0 and m["edit"] == pytest.approx(1 / 3) and m["length_error"] == 1.0 and m["no_eos"] == 1.0
    assert example_metrics([], [], [1], 3, 1)["edit"] == 0.0


def test_pairwise_win_rate_hand_cases():
    a = [{"exact": 1.0, "edit": 0.0}, {"exact": 0.0, "edit": 0.2}, {"exact": 0.0, "edit": 0.5},
         {"exact": 1.0, "edit": 0.0}]
    b = [{"exact": 0.0, "edit": 0.1}, {"exact": 0.0, "edit": 0.4}, {"exact": 1.0, "edit": 0.0},
         {"exact": 1.0, "edit": 0.0}]
    assert pairwise_outcomes(a, b).tolist() == [1.0, 1.0, 0.0, 0.5]
    wr = win_rate(a, b, samples=200)
    assert wr["mean"] == pytest.approx(2.5 / 4) and (wr["wins"], wr["losses"], wr["ties"]) == (2, 1, 1)
    assert 0.0 <= wr["lo"] <= wr["mean"] <= wr["hi"] <= 1.0
    assert win_rate(a, a, samples=50)["mean"] == 0.5


def test_bootstrap_intervals():
    const = bootstrap_mean([1.0] * 20, samples=100)
    assert (const["mean"], const["lo"], const["hi"], const["n"]) == (1.0, 1.0, 1.0, 20)
    ci = bootstrap_mean([0, 1] * 50, samples=2000, seed=1)
    assert ci["mean"] == 0.5 and 0.38 < ci["lo"] < 0.45 and 0.55 < ci["hi"] < 0.62
    assert bootstrap_mean([0, 1] * 50, samples=500, seed=3) == bootstrap_mean([0, 1] * 50, samples=500, seed=3)
    diff = paired_difference([1, 1, 1, 0], [0, 1, 1, 0], samples=300)
    assert diff["mean"] == 0.25 and diff["lo"] >= 0.0
