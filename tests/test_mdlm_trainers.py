"""The objective API the loop, transformers.Trainer and NeMo share; the Trainer integration; band bounds.

Oracles: the loop itself (``mdlm-ctc train``'s first step, ``objectives.compute_loss``), the exact band
width of the validated loss, and eager execution for the compiled step.
"""

import dataclasses
import os

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import mdlm_ctc  # noqa: E402
from mdlm_ctc.mdlm import model as M  # noqa: E402
from mdlm_ctc.mdlm import objectives as O  # noqa: E402
from mdlm_ctc.mdlm.config import Config, ObjectiveConfig  # noqa: E402
from mdlm_ctc.mdlm.data import Encoded  # noqa: E402
from mdlm_ctc.mdlm.hf_trainer import (MDLMCollator, MDLMTrainer, MDLMTrainerMixin, add_slack_token,  # noqa: E402
                                      loop_order, mdlm_loss, sft_features)
from mdlm_ctc.mdlm.train import prepare, read_metrics, train_run  # noqa: E402
from test_mdlm_objectives import TINY, setup  # noqa: E402,F401  (the tiny model, tokenizer and rows)

LOOP = dict(TINY, synthetic_train_size=64, synthetic_eval_size=10, max_length=24, synthetic_max_len=6, batch_size=8,
            progress=False, warmup_steps=0, log_every=1, checkpoint_every=0, lr=3e-3)
STEPS = 16


def _objective(**options):
    return dataclasses.replace(ObjectiveConfig(), **options)


def _grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


# ------------------------------------------------------------------------------ the API is the loop's loss
CASES = [("ce", {}), ("ctc", {}), ("ce+ctc", {"ctc_weight": 0.3}),
         ("ctc", {"slack_insertion": "random", "slack_rate": 0.5, "slack_budget_ratio": 0.5}),
         ("ctc", {"slack_insertion": "probe", "slack_rate": 1.0}),
         ("ctc", {"ctc_canvas": "slack", "ctc_max_shift": 1, "normalization": "token"}),
         ("ctc", {"slack_insertion": "best", "normalization": "batch"})]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("objective,options", CASES)
def test_api_equals_the_loop_bit_for_bit(setup, objective, options, fused):
    """make_batch -> corrupt -> model -> objective_loss == objectives.compute_loss (the loop): loss and gradients."""
    _, _, hf, special, rows = setup
    spec = _objective(objective=objective, **options)
    net = M.DiffusionLM(hf)
    head = O.resolve_fused_lm_head("on", hf) if fused else None
    seeds = [11, 12, 13, 14]
    loop_batch = O.collate(rows, 16, special.eos_id, seeds)
    denoms = O.denominators(rows, 16)
    net.zero_grad()
    loop, _ = O.compute_loss(net, loop_batch, objective=objective, special=special, obj_cfg=spec, denoms=denoms,
                             head=head, align_model=net)
    loop.backward()
    loop_grads = _grads(net)

    batch = O.make_batch(loop_batch.input_ids.clone(), torch.tensor([len(r.prompt_ids) for r in rows]),
                         eos_id=special.eos_id, noise_seeds=seeds)  # answer lengths from the EOS padding
    assert torch.equal(batch.answer_lengths, loop_batch.answer_lengths)
    want = "hidden" if fused else "logits"
    corruption = O.corrupt(batch, spec, special, align=lambda ids: O._logits(net, ids, head))
    net.zero_grad()
    loss, stats = O.objective_loss(net(corruption.noisy_ids, want=want), corruption, head=head)
    loss.backward()
    assert torch.equal(loss.detach(), loop.detach()) and torch.equal(_grads(net), loop_grads)
    assert stats["mask_rate"] > 0 and ("ctc" in stats) == (objective != "ce")


def test_make_batch_checks_its_arguments(setup):
    _, _, _, special, rows = setup
    ids = O.collate(rows, 16, special.eos_id, [1, 2, 3, 4]).input_ids
    prompts = torch.tensor([len(r.prompt_ids) for r in rows])
    with pytest.raises(ValueError, match="`prompt_lengths` is required"):
        O.make_batch(ids, None, eos_id=special.eos_id, noise_seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"`prompt_lengths` must be 4 integers"):
        O.make_batch(ids, prompts[:3], eos_id=special.eos_id, noise_seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"`prompt_lengths\[1\]` = 16 leaves no canvas"):
        O.make_batch(ids, torch.tensor([3, 16, 3, 3]), eos_id=special.eos_id, noise_seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"`answer_lengths\[0\]` = 14 does not fit"):
        O.make_batch(ids, prompts, torch.tensor([14, 1, 1, 0]), eos_id=special.eos_id, noise_seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="`noise_seeds` must be 4 integers"):
        O.make_batch(ids, prompts, eos_id=special.eos_id, noise_seeds=[1, 2])
    with pytest.raises(ValueError, match="`input_ids` must be a 2-D integer tensor"):
        O.make_batch(ids.float(), prompts, eos_id=special.eos_id, noise_seeds=[1, 2, 3, 4])


def test_corrupt_and_objective_loss_check_their_arguments(setup):
    _, _, hf, special, rows = setup
    batch = O.collate(rows, 16, special.eos_id, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="`slack_budget` must be >= 0"):
        O.corrupt(batch, _objective(slack_budget=-1), special)
    with pytest.raises(TypeError, match="`slack_budget` must be int"):
        O.corrupt(batch, _objective(slack_budget="2"), special)
    with pytest.raises(ValueError, match="`objective` must be one of"):
        O.corrupt(batch, _objective(objective="mlm"), special)
    with pytest.raises(TypeError, match="`special` must be a SpecialIds"):
        O.corrupt(batch, _objective(), {"mask_id": 2})
    with pytest.raises(ValueError, match="slack_insertion='best' needs `align`"):
        O.corrupt(batch, _objective(slack_insertion="best"), special)
    corruption = O.corrupt(batch, _objective(), special)
    logits = hf(input_ids=corruption.noisy_ids).logits
    with pytest.raises(ValueError, match=r"`output` must be the model's logits .* shape \(4, 16, V\)"):
        O.objective_loss(logits[:, :8], corruption)
    with pytest.raises(TypeError, match="`corruption` must be the Corruption"):
        O.objective_loss(logits, {"clean_ids": corruption.clean_ids})


# ------------------------------------------------------------------------------ band bound (item 4)
def _spy_band_widths(monkeypatch):
    from mdlm_ctc import losses

    widths, real = [], losses._ops.lattice_forward

    def spy(*args):
        widths.append(args[8])
        return real(*args)

    monkeypatch.setattr(losses._ops, "lattice_forward", spy)
    return widths


@pytest.mark.parametrize("options,bound", [({"slack_budget": 2}, 3),
                                           ({"slack_budget": 1, "slack_insertion": "random"}, 2),
                                           ({"ctc_canvas": "slack", "ctc_max_shift": 1}, 2)])
def test_band_bound_keeps_tables_band_sized_without_the_sync(setup, monkeypatch, options, bound):
    _, _, hf, special, rows = setup
    batch = O.collate(rows, 16, special.eos_id, [1, 2, 3, 4])
    corruption = O.corrupt(batch, _objective(**options), special)
    exact = mdlm_ctc.reference.column_band_width(corruption.canvas_lengths, corruption.target_lengths,
                                                 corruption.spec.ctc_max_shift)
    assert corruption.band_bound == int(exact.max()) == bound
    fallback = min(corruption.targets.shape[1], corruption.canvas_width)  # what an unbounded unvalidated call uses
    assert bound < fallback
    widths = _spy_band_widths(monkeypatch)
    logits = hf(input_ids=corruption.noisy_ids).logits
    checked, _ = O.objective_loss(logits, corruption)
    unchecked, _ = O.objective_loss(logits, corruption, validate=False)
    assert widths == [bound, bound] and torch.equal(checked, unchecked)


def test_the_loops_step_under_compile_keeps_band_sized_tables(setup):
    """``torch.compile`` of the loop's micro-batch loss: the lattice op in the graph gets the band bound."""
    _, _, hf, special, rows = setup
    net = M.DiffusionLM(hf)
    spec = _objective(slack_budget=2)
    batch = O.collate(rows[:2], 16, special.eos_id, [5, 6])
    denoms = O.denominators(rows[:2], 16)
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(node.args[8] for node in gm.graph.nodes
                    if node.op == "call_function" and "lattice_forward" in str(node.target))
        return gm.forward

    torch._dynamo.reset()
    net.zero_grad()
    compiled, _ = torch.compile(O.compute_loss, backend=recording_backend)(
        net, batch, objective="ctc", special=special, obj_cfg=spec, denoms=denoms)
    compiled.backward()
    compiled_grads = _grads(net)
    torch._dynamo.reset()
    corruption = O.corrupt(batch, spec, special)
    fallback = min(corruption.targets.shape[1], corruption.canvas_width)  # min(U_max, T) without the bound
    assert seen == [corruption.band_bound] == [3] and fallback == 10
    net.zero_grad()
    eager, _ = O.compute_loss(net, batch, objective="ctc", special=special, obj_cfg=spec, denoms=denoms)
    eager.backward()
    assert torch.equal(compiled.detach(), eager.detach()) and torch.equal(compiled_grads, _grads(net))


# ------------------------------------------------------------------------------ transformers.Trainer
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = Config.from_dict(dict(LOOP, output_dir=str(tmp_path_factory.mktemp("runs")), name="prep"))
    return cfg, prepare(cfg, cfg.run_dir(), log=lambda *a: None)


def _loop_first_step(cfg, prepared, objective, **changes):
    run_cfg = Config.from_dict(dict(LOOP, output_dir=cfg.run.output_dir, name=f"loop-{objective}", steps=1,
                                    objective=objective, **changes))
    train_run(run_cfg, prepared, run_cfg.run_dir(), log=lambda *a: None)
    return read_metrics(os.path.join(run_cfg.run_dir(), "metrics.jsonl"))[0]["loss"]


def _args(tmp_path, **changes):
    return TrainingArguments(**dict(dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS,
                                         logging_steps=1, learning_rate=3e-3, lr_scheduler_type="constant",
                                         train_sampling_strategy="sequential", use_cpu=True, report_to=[],
                                         save_strategy="no", seed=0, disable_tqdm=True), **changes))


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("objective", ["ce", "ctc"])
def test_trainer_trains_and_its_first_step_is_the_loops(prepared, tmp_path, objective):
    """transformers.Trainer + MDLMCollator + compute_loss_func=mdlm_loss: the loss falls, and step 1 equals
    ``mdlm-ctc train``'s step 1 on the same rows (same weights, rows, noise and normalisation)."""
    cfg, prep = prepared
    model, _, special = M.load_model_dir(prep.init_source, cfg, torch.device("cpu"))
    rows = sft_features(loop_order(prep.train_rows, batch_size=8, seed=cfg.run.seed, steps=STEPS))
    collator = MDLMCollator(special, _objective(objective=objective), max_length=cfg.data.max_length,
                            seed=cfg.run.seed)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=rows, data_collator=collator,
                      compute_loss_func=mdlm_loss)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == STEPS
    assert losses[0] == _loop_first_step(cfg, prep, objective)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


def test_mixin_accumulates_like_the_loop_and_resumes_exactly(prepared, tmp_path):
    """MDLMTrainerMixin on a dllm-like Trainer subclass: 2 x 4 accumulated rows == the loop's 8-row step, and a
    run resumed from its step-2 checkpoint repeats steps 3 and 4 (the noise count restarts at the step)."""

    class DllmLikeTrainer(Trainer):  # dllm's MDLMTrainer overrides compute_loss with its own masking
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            raise AssertionError("the mixin's compute_loss must be used")

    class SlackCTCTrainer(MDLMTrainerMixin, DllmLikeTrainer):
        pass

    cfg, prep = prepared
    rows = loop_order(prep.train_rows, batch_size=8, seed=cfg.run.seed, steps=4)  # Encoded rows as they are
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                 save_strategy="steps", save_steps=2)

    def trainer():
        model, _, special = M.load_model_dir(prep.init_source, cfg, torch.device("cpu"))
        collator = MDLMCollator(special, _objective(objective="ce+ctc"), max_length=cfg.data.max_length,
                                seed=cfg.run.seed)
        return SlackCTCTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)

    whole = trainer()
    whole.train()
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert _losses(resumed)[2:] == _losses(whole)[2:] and len(_losses(whole)) == 4
    loop = _loop_first_step(cfg, prep, "ce+ctc", micro_batch_size=4)
    assert _losses(whole)[0] == pytest.approx(loop, rel=1e-6)  # float32 vs float64 sum of the two micro losses
    assert isinstance(MDLMTrainer(model=whole.model, args=args), Trainer)


def test_mdlm_loss_refuses_accumulation_and_foreign_labels(setup):
    from accelerate.state import GradientState

    _, _, hf, special, rows = setup
    batch = MDLMCollator(special, max_length=16)(rows)
    outputs = hf(input_ids=batch["input_ids"])
    state = GradientState()
    state._set_sync_gradients(False)
    try:
        with pytest.raises(ValueError, match="gradient_accumulation_steps > 1 with compute_loss_func"):
            mdlm_loss(outputs, batch["labels"])
    finally:
        state._set_sync_gradients(True)
    assert torch.isfinite(mdlm_loss(outputs, batch["labels"]))
    with pytest.raises(TypeError, match="`labels` must be the Corruption that MDLMCollator"):
        mdlm_loss(outputs, batch["input_ids"])


def test_collator_reads_every_row_form_alike(setup):
    _, tok, _, special, rows = setup
    collator = MDLMCollator(special, _objective(slack_insertion="random"), max_length=16)
    eos = special.eos_id
    forms = [rows, sft_features(rows),
             [{"input_ids": r.prompt_ids + r.answer_ids + [eos, eos], "prompt_len": len(r.prompt_ids)} for r in rows],
             [{"prompt_ids": r.prompt_ids, "answer_ids": r.answer_ids} for r in rows]]
    outs = []
    for form in forms:
        collator.start, collator._calls = 0, 0
        outs.append(collator(form))
    for out in outs[1:]:
        assert torch.equal(out["input_ids"], outs[0]["input_ids"])
        assert torch.equal(out["labels"].clean_ids, outs[0]["labels"].clean_ids)
    first, second = collator(rows), collator(rows)  # the next batches draw other noise
    assert not torch.equal(first["labels"].masked, second["labels"].masked)
    assert outs[0]["labels"].rows == 4 and outs[0]["labels"].tokens == sum(16 - len(r.prompt_ids) for r in rows)


def test_collator_rejects_bad_rows_and_options(setup):
    _, _, _, special, rows = setup
    collator = MDLMCollator(special, max_length=16)
    ids = rows[0].prompt_ids + rows[0].answer_ids
    with pytest.raises(ValueError, match="feature 0 has no prompt length: give `labels`"):
        collator([{"input_ids": ids}])
    with pytest.raises(ValueError, match=r"feature 0: `labels\[4\]` = 9 but `input_ids\[4\]`"):
        collator([{"input_ids": ids, "labels": [-100] * 4 + [9] + ids[5:]}])
    with pytest.raises(ValueError, match=r"feature 1 contains the mask id"):
        collator([rows[0], Encoded(rows[1].prompt_ids, [special.mask_id])])
    with pytest.raises(ValueError, match=r"feature 0 contains the slack id"):
        collator([Encoded(rows[0].prompt_ids, [special.slack_id])])
    with pytest.raises(ValueError, match=r"feature 0 needs 19 positions .* has 16 \(`max_length`\)"):
        collator([Encoded(rows[0].prompt_ids, rows[0].answer_ids * 7)])
    with pytest.raises(ValueError, match="`prompt_length` must be an integer in"):
        collator([{"input_ids": ids, "prompt_length": 40}])
    with pytest.raises(ValueError, match="slack_insertion='best' needs the model"):
        MDLMCollator(special, _objective(slack_insertion="best"))
    with pytest.raises(TypeError, match="`special` must be the SpecialIds"):
        MDLMCollator((2, 1, 3))
    with pytest.raises(ValueError, match="`max_length` must be an integer"):
        MDLMCollator(special, max_length=0)
    with pytest.raises(ValueError, match="`pad_to` must be"):
        MDLMCollator(special, pad_to="left")


def test_add_slack_token_is_the_loops(setup):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def tokenizer(**special_tokens):
        core = Tokenizer(models.WordLevel(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        core.train_from_iterator(["a b c"], trainer=trainers.WordLevelTrainer(
            special_tokens=["<pad>", "<eos>", "<mask>", "<unk>"]))
        return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **special_tokens)

    cfg, *_ = setup
    models_ = [M.build_embedded_model(cfg, 7, 16, seed=0) for _ in range(2)]
    toks = [tokenizer(pad_token="<pad>", eos_token="<eos>", mask_token="<mask>") for _ in range(2)]
    ours = add_slack_token(models_[0], toks[0])
    loops = M.resolve_special_ids(models_[1], toks[1], cfg)
    assert ours == loops and len(toks[0]) == len(toks[1]) == 8
    assert torch.equal(models_[0].get_input_embeddings().weight, models_[1].get_input_embeddings().weight)
    with pytest.raises(ValueError, match=r"`tokenizer` \(\w+\) has no mask token"):
        add_slack_token(M.build_embedded_model(cfg, 7, 16, seed=0), tokenizer(eos_token="<eos>"))
    with pytest.raises(ValueError, match="has no EOS token; pass eos_token= or eos_id="):
        add_slack_token(M.build_embedded_model(cfg, 7, 16, seed=0), tokenizer(mask_token="<mask>"))
    with pytest.raises(ValueError, match=r"`slack_id` must be a token id >= 0 or None; got -1"):
        add_slack_token(models_[0], toks[0], slack_id=-1)
    with pytest.raises(ValueError, match=r"`slack_id` 99 is outside the embedding matrix"):
        add_slack_token(models_[0], toks[0], slack_id=99)
    with pytest.raises(ValueError, match=r"the slack id 0 is the tokenizer's pad token"):
        add_slack_token(M.build_embedded_model(cfg, 7, 16, seed=0),
                        tokenizer(pad_token="<pad>", eos_token="<eos>", mask_token="<mask>"), slack_id=0)
