"""Objectives: LLaDA's forward process and CE, the slack-CTC canvas and loss, normalisation, the fused switch."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mdlm_ctc  # noqa: E402
from mdlm_ctc.mdlm import model as M  # noqa: E402
from mdlm_ctc.mdlm import objectives as O  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.data import Encoded  # noqa: E402
from mdlm_ctc.mdlm.tokenizer import train_tokenizer  # noqa: E402

TINY = {"tiny_hidden_size": 32, "tiny_layers": 2, "tiny_heads": 4, "tiny_kv_heads": 2, "tiny_intermediate_size": 64}


@pytest.fixture(scope="module")
def setup():
    cfg = Config.from_dict(dict(TINY, max_length=16))
    tok = train_tokenizer(["copy : a b c d", "reverse : d c b a", "1 0 0 0"], 100)
    hf = M.build_embedded_model(cfg, len(tok), 16, seed=0)
    special = M.resolve_special_ids(hf, tok, cfg)
    rows = [Encoded(tok("copy : a b")["input_ids"], tok("a b")["input_ids"]),
            Encoded(tok("reverse : a b c")["input_ids"], tok("c b a")["input_ids"]),
            Encoded(tok("copy : a")["input_ids"], tok("a")["input_ids"]),
            Encoded(tok("copy : d c")["input_ids"], [])]
    return cfg, tok, hf, special, rows


def _batch(rows, special, length=16, seeds=(11, 12, 13, 14)):
    return O.collate(rows, length, special.eos_id, list(seeds)[: len(rows)])


def _without_masking(monkeypatch):
    """The forward process masks nothing (its noise draws are otherwise unchanged)."""
    real = O.draw_noise

    def unmasked(batch, eps):
        noise = real(batch, eps)
        noise.masked[:] = False
        return noise

    monkeypatch.setattr(O, "draw_noise", unmasked)


def test_embedded_model_is_bidirectional(setup):
    _, _, hf, _, _ = setup
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    y = x.clone()
    y[0, -1] = 11
    with torch.no_grad():
        assert not torch.allclose(hf(input_ids=x).logits[0, 0], hf(input_ids=y).logits[0, 0])


def test_layout_and_forward_process(setup):
    cfg, _, _, special, rows = setup
    batch = _batch(rows, special)
    assert batch.input_ids.shape == (4, 16)
    p0 = len(rows[0].prompt_ids)
    assert batch.input_ids[0, :p0].tolist() == rows[0].prompt_ids
    assert batch.input_ids[0, p0:p0 + 2].tolist() == rows[0].answer_ids
    assert (batch.input_ids[0, p0 + 2:] == special.eos_id).all()  # EOS padding (trained by CE)
    noise = O.draw_noise(batch, 1e-3)
    for b, r in enumerate(rows):
        assert not noise.masked[b, : len(r.prompt_ids)].any()  # the prompt is never masked
    again = O.draw_noise(_batch(rows, special), 1e-3)
    assert torch.equal(noise.masked, again.masked) and torch.equal(noise.p, again.p)
    # a row's noise does not depend on the other rows of its batch
    alone = O.draw_noise(_batch(rows[1:2], special, seeds=(12,)), 1e-3)
    assert torch.equal(alone.masked[0], noise.masked[1])
    assert ((noise.p > 0) & (noise.p <= 1)).all()


def test_ce_is_llada_sft(setup):
    cfg, _, hf, special, rows = setup
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    denoms = O.denominators(rows, 16)
    loss, _ = O.compute_loss(net, batch, objective="ce", special=special, obj_cfg=cfg.objective, denoms=denoms)
    # LLaDA GUIDELINES: noisy = mask where masked; token_loss = CE(masked) / p; sum(token_loss / answer_len) / B
    noise = O.draw_noise(batch, cfg.objective.mask_eps)
    noisy = torch.where(noise.masked, special.mask_id, batch.input_ids)
    logits = hf(input_ids=noisy).logits
    p = noise.p[:, None].expand_as(noise.masked)
    token_loss = F.cross_entropy(logits[noise.masked], batch.input_ids[noise.masked], reduction="none")
    token_loss = token_loss / p[noise.masked]
    answer_lengths = (16 - batch.prompt_lengths)[:, None].expand_as(noise.masked)[noise.masked]
    expected = (token_loss / answer_lengths).sum() / 4
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_ctc_canvas_collapses_to_answer_plus_eos(setup):
    cfg, _, _, special, rows = setup
    batch = _batch(rows, special)
    targets, lengths = O.ctc_targets(batch, special.eos_id)
    assert lengths.tolist() == [len(r.answer_ids) + 1 for r in rows]
    noise = O.draw_noise(batch, 1e-3)
    for insertion, rate in (("none", 0.0), ("random", 0.5), ("random", 0.95)):
        clean = O.clean_ctc_canvas(batch, targets, lengths, noise, slack_id=special.slack_id, insertion=insertion,
                                   rate=rate)
        for b, r in enumerate(rows):
            P = len(r.prompt_ids)
            assert clean[b, :P].tolist() == r.prompt_ids
            ids, n = mdlm_ctc.collapse(clean[b, P:], special.slack_id)
            assert ids[:n].tolist() == r.answer_ids + [special.eos_id]
            if insertion == "none":
                assert clean[b, P:P + len(r.answer_ids) + 1].tolist() == r.answer_ids + [special.eos_id]


@pytest.mark.parametrize("budget,ratio,max_shift", [(0, 0.0, None), (2, 0.0, None), (1, 0.5, None), (3, 0.0, 1),
                                                    (20, 0.0, None)])
def test_eos_canvas_is_llada_canvas_with_a_slack_budget(setup, budget, ratio, max_shift):
    cfg, _, _, special, rows = setup
    obj = Config.from_dict(dict(TINY, max_length=16, ctc_canvas="eos", slack_budget=budget, slack_budget_ratio=ratio,
                                ctc_max_shift=max_shift, slack_insertion="random", slack_rate=0.6)).objective
    batch = _batch(rows, special)
    targets, lengths = O.ctc_targets(batch, special.eos_id, obj)
    budgets = O.slack_budgets(batch, obj)
    noise = O.draw_noise(batch, 1e-3)
    clean = O.clean_ctc_canvas(batch, targets, lengths, noise, slack_id=special.slack_id, insertion="random",
                               rate=obj.slack_rate)
    for b, r in enumerate(rows):
        P, A = len(r.prompt_ids), len(r.answer_ids)
        T = 16 - P
        m = min(budget + int(torch.ceil(torch.tensor(ratio * A)).item()), max_shift if max_shift is not None else 99,
                T - A - 1)
        assert int(budgets[b]) == m and int(lengths[b]) == T - m
        # the target is LLaDA's canvas (answer, then EOS padding) less m EOS
        assert targets[b, : lengths[b]].tolist() == r.answer_ids + [special.eos_id] * (T - m - A)
        canvas = clean[b, P:]
        assert int((canvas == special.slack_id).sum()) == m  # exactly the budget
        ids, n = mdlm_ctc.collapse(canvas, special.slack_id)
        assert ids[:n].tolist() == targets[b, : lengths[b]].tolist()


def test_eos_canvas_without_slack_is_exactly_ce(setup):
    """The control: slack_budget 0 (or ctc_max_shift 0) on the eos canvas is LLaDA's CE, loss and gradients."""
    _, _, hf, special, rows = setup
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    denoms = O.denominators(rows, 16)

    def loss_and_grads(objective, **options):
        obj = Config.from_dict(dict(TINY, max_length=16, **options)).objective
        net.zero_grad()
        loss, _ = O.compute_loss(net, batch, objective=objective, special=special, obj_cfg=obj, denoms=denoms)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    ce, ce_grad = loss_and_grads("ce")
    for options in ({"slack_budget": 0, "slack_insertion": "random"}, {"slack_budget": 3, "ctc_max_shift": 0}):
        ctc, ctc_grad = loss_and_grads("ctc", ctc_canvas="eos", **options)
        torch.testing.assert_close(ctc, ce, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ctc_grad, ce_grad, rtol=1e-5, atol=1e-6)
    # with slack slots the lattice sums over every canvas with that many slack tokens, the clean one among
    # them: its loss is below position-wise CE against that clean canvas (same masks, same weights)
    for insertion in ("none", "random"):
        options = dict(ctc_canvas="eos", slack_budget=2, slack_insertion=insertion, slack_rate=0.5)
        free, _ = loss_and_grads("ctc", **options)
        fixed, _ = loss_and_grads("ce+ctc", ctc_weight=0.0, **options)
        assert float(free) < float(fixed)


def test_probe_insertion_is_the_shift_probes_canvas(setup, monkeypatch):
    """``probe``: one slack before a random answer token (rate 1: every row with room), always masked."""
    cfg, _, hf, special, rows = setup
    obj = Config.from_dict(dict(TINY, max_length=16, ctc_canvas="eos", slack_budget=2, slack_insertion="probe",
                                slack_rate=1.0)).objective
    batch = _batch(rows, special)
    targets, lengths = O.ctc_targets(batch, special.eos_id, obj)
    noise = O.draw_noise(batch, 1e-3)
    clean, inserted = O.clean_ctc_canvas(batch, targets, lengths, noise, slack_id=special.slack_id, insertion="probe",
                                         rate=1.0, return_inserted=True)
    for b, r in enumerate(rows):
        P, A = len(r.prompt_ids), len(r.answer_ids)
        ids, n = mdlm_ctc.collapse(clean[b, P:], special.slack_id)
        assert ids[:n].tolist() == targets[b, : lengths[b]].tolist()
        where = inserted[b].nonzero().flatten().tolist()
        assert len(where) == (1 if A >= 1 else 0)  # the empty answer has no token to displace
        if where:
            k = where[0] - P
            assert 0 <= k < A and clean[b, where[0]] == special.slack_id
            assert clean[b, P + k + 1] == r.answer_ids[k]  # the displaced token sits one position right
    # nothing masked by the forward process: only the probe's positions are free, so the loss is not 0
    _without_masking(monkeypatch)
    net = M.DiffusionLM(hf)
    denoms = O.denominators(rows, 16)
    probe, _ = O.compute_loss(net, batch, objective="ctc", special=special, obj_cfg=obj, denoms=denoms)
    none, _ = O.compute_loss(net, batch, objective="ctc", special=special,
                             obj_cfg=Config.from_dict(dict(TINY, max_length=16, slack_insertion="none")).objective,
                             denoms=denoms)
    assert float(none) == 0.0 and float(probe) > 0.0


def test_probe_visible_shows_the_displaced_token(setup, monkeypatch):
    """``probe_visible``: the probe's canvas with the displaced token always visible and its old position masked,
    whatever the forward process masks (the state the sampler's probe creates)."""
    cfg, _, hf, special, rows = setup
    real = O.draw_noise

    def all_masked(batch, eps):
        noise = real(batch, eps)
        noise.masked[:] = torch.arange(batch.input_ids.shape[1])[None, :] >= batch.prompt_lengths[:, None]
        return noise

    monkeypatch.setattr(O, "draw_noise", all_masked)
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ids, want="logits"):
            seen["ids"] = ids.clone()
            return self.net(ids, want=want)

    batch = _batch(rows, special)
    net = Spy(M.DiffusionLM(hf))
    for insertion in ("probe", "probe_visible"):
        obj = Config.from_dict(dict(TINY, max_length=16, ctc_canvas="eos", slack_budget=2, slack_insertion=insertion,
                                    slack_rate=1.0)).objective
        O.compute_loss(net, batch, objective="ctc", special=special, obj_cfg=obj, denoms=O.denominators(rows, 16))
        _, inserted = O.clean_ctc_canvas(batch, *O.ctc_targets(batch, special.eos_id, obj), all_masked(batch, 1e-3),
                                         slack_id=special.slack_id, insertion=insertion, rate=1.0, return_inserted=True)
        for b, r in enumerate(rows):
            where = inserted[b].nonzero().flatten().tolist()
            visible = [j for j in range(len(r.prompt_ids), 16) if seen["ids"][b, j] != special.mask_id]
            if insertion == "probe" or not where:
                assert visible == []
            else:
                k = where[0]
                assert visible == [k + 1] and seen["ids"][b, k + 1] == r.answer_ids[k - len(r.prompt_ids)]


def test_random_slack_counts_fit_the_room():
    g = torch.Generator().manual_seed(0)
    for room in (0, 1, 3, 10):
        counts = O.random_slack_counts(8, room, 0.9, g)
        assert counts.sum() <= room and (counts >= 0).all()
    assert O.random_slack_counts(8, 5, 0.0, g).sum() == 0


def test_ctc_loss_is_slack_ctc_with_observed_anchors(setup):
    cfg, _, hf, special, rows = setup
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    denoms = O.denominators(rows, 16)
    obj = Config.from_dict(dict(TINY, max_length=16, slack_insertion="random", slack_rate=0.3)).objective
    loss, stats = O.compute_loss(net, batch, objective="ctc", special=special, obj_cfg=obj, denoms=denoms)
    noise = O.draw_noise(batch, obj.mask_eps)
    targets, lengths = O.ctc_targets(batch, special.eos_id, obj)
    clean = O.clean_ctc_canvas(batch, targets, lengths, noise, slack_id=special.slack_id, insertion="random",
                               rate=obj.slack_rate)
    noisy = torch.where(noise.masked, special.mask_id, clean)
    logits = hf(input_ids=noisy).logits
    expected = 0.0
    for b, r in enumerate(rows):
        P = len(r.prompt_ids)
        observed = torch.where(noise.masked[b, P:], -1, clean[b, P:])
        nll = mdlm_ctc.slack_ctc_loss(logits[b:b + 1, P:], targets[b:b + 1, : lengths[b]], slack_id=special.slack_id,
                                      observed=observed[None], reduction="sum")
        expected = expected + nll / noise.p[b] / (16 - P)
    torch.testing.assert_close(loss, expected / 4, rtol=1e-5, atol=1e-6)
    assert 0 < float(stats["slack_fraction"]) < 1


def test_ctc_without_masked_positions_is_zero(setup, monkeypatch):
    cfg, _, hf, special, rows = setup
    batch = _batch(rows, special)
    net = M.DiffusionLM(hf)
    _without_masking(monkeypatch)
    for objective in ("ce", "ctc"):
        loss, _ = O.compute_loss(net, batch, objective=objective, special=special, obj_cfg=cfg.objective,
                                 denoms=O.denominators(rows, 16))
        assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("objective", ["ce", "ctc", "ce+ctc"])
@pytest.mark.parametrize("normalization", ["sequence", "token", "batch"])
def test_normalisations_and_gradients(setup, objective, normalization):
    _, _, hf, special, rows = setup
    cfg = Config.from_dict(dict(TINY, max_length=16, normalization=normalization))
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    denoms = O.denominators(rows, 16)
    loss, stats = O.compute_loss(net, batch, objective=objective, special=special, obj_cfg=cfg.objective,
                                 denoms=denoms)
    net.zero_grad()
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    if objective == "ce+ctc":
        torch.testing.assert_close(loss.detach(), 0.5 * stats["ce"] + 0.5 * stats["ctc"])
    # splitting the batch in two with the global denominators gives the same total
    half = [O.compute_loss(net, _batch(rows[i:i + 2], special, seeds=(11 + i, 12 + i)), objective=objective,
                           special=special, obj_cfg=cfg.objective, denoms=denoms)[0] for i in (0, 2)]
    torch.testing.assert_close(half[0] + half[1], loss.detach(), rtol=1e-5, atol=1e-6)


def test_best_alignment_insertion(setup):
    _, _, hf, special, rows = setup
    cfg = Config.from_dict(dict(TINY, max_length=16, slack_insertion="best"))
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    targets, lengths = O.ctc_targets(batch, special.eos_id)
    alignment = O.best_canvas_alignment(net, batch, targets, lengths, special, None, None)
    for b in range(4):
        ids, n = mdlm_ctc.collapse(alignment[b], special.slack_id)
        assert ids[:n].tolist() == targets[b, : lengths[b]].tolist()
    loss, _ = O.compute_loss(net, batch, objective="ctc", special=special, obj_cfg=cfg.objective,
                             denoms=O.denominators(rows, 16), align_model=net)
    assert torch.isfinite(loss)


def test_fused_lm_head_switch(setup, monkeypatch):
    cfg, _, hf, special, rows = setup
    had = hasattr(mdlm_ctc, "linear_slack_ctc_loss")
    if had:
        monkeypatch.delattr(mdlm_ctc, "linear_slack_ctc_loss")
    assert O.resolve_fused_lm_head("on", hf) is None  # no fused function: logits
    calls = []

    def fake_linear(hidden, weight, targets, target_lengths=None, *, bias=None, **kwargs):
        calls.append(hidden.shape)
        kwargs["weight"] = kwargs.pop("row_weight", None)  # the fused loss's name for the per-row weight
        return mdlm_ctc.slack_ctc_loss(F.linear(hidden, weight, bias), targets, target_lengths, **kwargs)

    monkeypatch.setattr(mdlm_ctc, "linear_slack_ctc_loss", fake_linear, raising=False)
    assert O.resolve_fused_lm_head("off", hf) is None
    assert O.resolve_fused_lm_head("auto", hf) is None  # tiny vocabulary
    head = O.resolve_fused_lm_head("on", hf)
    assert head is not None and head.weight is hf.lm_head.weight
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    denoms = O.denominators(rows, 16)
    for objective in ("ce", "ctc", "ce+ctc"):
        fused, _ = O.compute_loss(net, batch, objective=objective, special=special, obj_cfg=cfg.objective,
                                  denoms=denoms, head=head)
        plain, _ = O.compute_loss(net, batch, objective=objective, special=special, obj_cfg=cfg.objective,
                                  denoms=denoms)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert calls and calls[0][-1] == hf.config.hidden_size  # the CTC loss got hidden states


def test_slack_is_added_when_the_vocabulary_lacks_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.train_from_iterator(["a b c"], trainer=trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<mask>",
                                                                                          "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>",
                                  unk_token="<unk>")
    cfg = Config.from_dict(TINY)
    hf = M.build_embedded_model(cfg, len(tok), 16, seed=0)
    rows_before = hf.get_input_embeddings().weight.shape[0]
    special = M.resolve_special_ids(hf, tok, cfg)
    assert special.slack_id == rows_before and tok.convert_ids_to_tokens(special.slack_id) == "<slack>"
    emb = hf.get_input_embeddings().weight
    assert emb.shape[0] == rows_before + 1
    torch.testing.assert_close(emb[special.slack_id], emb[:rows_before].mean(0))
    assert hf.lm_head.weight.shape[0] == rows_before + 1
    # saved and loaded back, the ids are kept
    M.save_model_dir(hf, tok, special, str(tmp_path / "m"))
    _, tok2, special2 = M.load_model_dir(str(tmp_path / "m"), cfg, torch.device("cpu"))
    assert special2 == special and tok2.convert_tokens_to_ids("<slack>") == special.slack_id


def test_fused_lm_head_with_the_real_fused_loss(setup):
    """The loop's fused path through mdlm_ctc.linear_slack_ctc_loss gives the loss and the gradients of
    the logits path."""
    cfg, _, hf, special, rows = setup
    head = O.resolve_fused_lm_head("on", hf)
    assert head is not None
    net = M.DiffusionLM(hf)
    batch = _batch(rows, special)
    denoms = O.denominators(rows, 16)
    results = []
    for use_head in (head, None):
        net.zero_grad(set_to_none=True)
        loss, _ = O.compute_loss(net, batch, objective="ctc", special=special, obj_cfg=cfg.objective, denoms=denoms,
                                 head=use_head)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("normalization", ["sequence", "token", "batch"])
@pytest.mark.parametrize("fused", [False, True])
def test_ctc_weight_inside_the_op_equals_weighting_afterwards(setup, normalization, fused):
    """The CTC term passes 1/p and the normalisation to the loss as its per-row ``weight=`` (the gradient is
    final in the forward); loss and gradients equal the per-row losses weighted afterwards."""
    _, _, hf, special, rows = setup
    obj = Config.from_dict(dict(TINY, max_length=16, normalization=normalization)).objective
    net = M.DiffusionLM(hf)
    head = O.resolve_fused_lm_head("on", hf) if fused else None
    denoms = O.denominators(rows, 16)
    c = O.corrupt(_batch(rows, special), obj, special)
    results = []
    for weighted_in_op in (True, False):
        net.zero_grad(set_to_none=True)
        out = net(c.noisy_ids, want="hidden" if fused else "logits")
        if weighted_in_op:
            loss, _ = O.objective_loss(out, c, head=head, denominators=denoms)
        else:
            T = c.canvas_width
            canvas = O._canvas_view(out, c, T)
            clean = O._canvas_view(c.clean_ids[..., None], c, T)[..., 0]
            masked = O._canvas_view(c.masked[..., None], c, T)[..., 0]
            inside = torch.arange(T)[None, :] < c.canvas_lengths[:, None]
            observed = torch.where(masked | ~inside, -1, clean)
            nll = O.slack_ctc_nll(canvas, head, c.targets, c.target_lengths, c.canvas_lengths, observed,
                                  slack_id=special.slack_id, max_shift=obj.ctc_max_shift)
            assert nll.shape == (len(rows),)
            loss = O._normalise(nll.float() / c.p, c.canvas_lengths, normalization, denoms)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (inside_op, grads), (afterwards, expected) = results
    torch.testing.assert_close(inside_op, afterwards, rtol=1e-6, atol=1e-7)
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
