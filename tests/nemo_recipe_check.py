"""The slack_ctc strategy inside nemo-automodel's own dLLM recipe code (run by tests/test_mdlm_nemo.py).

Needs a Python with ``nemo-automodel`` and this checkout on ``PYTHONPATH`` (nemo-automodel pins its own
transformers, so it lives in a virtual environment of its own; see the test's skip reason). Builds a tiny
bidirectional Llama on the CPU, registers the strategy in NeMo's ``DLLM_STRATEGIES``, and runs NeMo's
``DiffusionLMSFTRecipe._apply_corruption`` (per-row seeded generators) and ``_forward_backward_step`` (the
loss call, the normalisation by the step's supervised tokens, backward) on a stand-in recipe object
holding only the attributes those two methods read. The oracle is the objective API called directly
with the same per-row generators: loss and gradients must agree bit for bit. Prints one JSON line.
"""

import json
import sys
import types

import torch
from nemo_automodel.recipes.dllm import strategy as nemo_strategy
from nemo_automodel.recipes.dllm.train_ft import DiffusionLMSFTRecipe, corruption_sample_seed

from mdlm_ctc.mdlm import nemo as N
from mdlm_ctc.mdlm import objectives as O
from mdlm_ctc.mdlm.config import Config
from mdlm_ctc.mdlm.model import SpecialIds, build_embedded_model

PAD, EOS, MASK, SLACK, VOCAB = 0, 1, 2, 3, 40


class Tokenizer:
    pad_token_id, eos_token_id, mask_token_id = PAD, EOS, MASK

    def get_vocab(self):
        return {"<pad>": PAD, "<eos>": EOS, "<mask>": MASK, "<slack>": SLACK}


class Recipe:
    """Only what ``_apply_corruption`` and ``_forward_backward_step`` of nemo-automodel 0.7.0 read."""

    _apply_corruption = DiffusionLMSFTRecipe._apply_corruption
    _forward_backward_step = DiffusionLMSFTRecipe._forward_backward_step
    _augment_batch_for_model = DiffusionLMSFTRecipe._augment_batch_for_model

    def __init__(self, strategy, model, dllm_cfg):
        self.step_scheduler = types.SimpleNamespace(step=0, grad_acc_steps=2)
        self._self_cond_base_seed = 42
        self.dllm_strategy = strategy
        self.mask_token_id = MASK
        self.dllm_eps = 1e-3
        self.dllm_block_size = None
        self.dllm_half_life_ratio = 0.25
        self.model_parts = [model]
        self.device_mesh = None
        self.te_fp8 = None
        self.distributed_config = types.SimpleNamespace(cp_size=1, defer_fsdp_grad_sync=True, autocast_dtype=None)
        self.dist_env = types.SimpleNamespace(device=torch.device("cpu"))
        self._dllm_loss_buffer = []
        self.tokenizer = Tokenizer()
        self.cfg = {"dllm": dllm_cfg}
        self.dllm_loss_fn = strategy.create_loss_fn(dllm_cfg)
        strategy.setup_extra(self)

    def _get_dp_group_size(self, include_cp=False):
        return 1


def micro_batches():
    """Two micro-batches of rows: prompt, answer, EOS padding (supervised, as supervise_padding does)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        ids = torch.full((3, 14), EOS, dtype=torch.long)
        mask = torch.zeros(3, 14)
        for b, (prompt, answer) in enumerate([(4, 5), (6, 3), (3, 7)]):
            ids[b, :prompt + answer] = torch.randint(5, VOCAB, (prompt + answer,), generator=g)
            mask[b, prompt:] = 1
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run(options: dict) -> dict:
    cfg = Config.from_dict({"tiny_hidden_size": 32, "tiny_layers": 2, "tiny_heads": 4, "tiny_kv_heads": 2,
                            "tiny_intermediate_size": 64})
    model = build_embedded_model(cfg, VOCAB, 16, seed=0)
    cls = N.register()
    strategy = nemo_strategy.get_dllm_strategy(N.STRATEGY_NAME)
    assert isinstance(strategy, nemo_strategy.DLLMStrategy) and isinstance(strategy, cls)
    dllm_cfg = dict({"mode": N.STRATEGY_NAME, "mask_token_id": MASK, "eps": 1e-3, "supervise_padding": True,
                     "slack_token_id": SLACK}, **options)
    recipe = Recipe(strategy, model, dllm_cfg)
    batches = micro_batches()
    _, supervised = strategy.pre_step(recipe, batches)
    buffer = []
    model.zero_grad()
    for i, batch in enumerate(batches):
        strategy.forward_backward(recipe, i, batch, loss_buffer=buffer, num_diffusion_tokens=supervised,
                                  num_ar_tokens=supervised, num_batches=len(batches), is_train=True)
    nemo_losses, nemo_grads = [float(x) for x in buffer], grads(model)

    # the oracle: the objective API with the recipe's per-row generators
    spec = N.objective_from_dllm_config(dllm_cfg)
    special = SpecialIds(mask_id=MASK, eos_id=EOS, slack_id=SLACK, pad_id=PAD)
    model.zero_grad()
    ours = []
    for i, batch in enumerate(micro_batches()):
        ids, mask = batch["input_ids"], batch["loss_mask"].bool()
        prompts = (~mask).sum(1)
        answers = torch.tensor([int((ids[b, int(prompts[b]):] != EOS).sum()) for b in range(3)])
        rows = O.Batch(ids, prompts, answers, [0, 0, 0])
        generators = [torch.Generator().manual_seed(corruption_sample_seed(42, 0, 0, 1, 3, 2, i, j)) for j in range(3)]
        c = O.corrupt(rows, spec, special, noise=O.draw_noise(rows, 1e-3, generators=generators))
        logits = model(input_ids=c.noisy_ids).logits
        loss, _ = O.objective_loss(logits, c, denominators={"rows": 6.0, "tokens": float(supervised)})
        loss.backward()
        ours.append(float(loss.detach()))
    same_grads = bool(torch.equal(nemo_grads, grads(model)))

    # NeMo's own MDLM cross-entropy on this corruption: the loop's CE with token normalisation
    ce_check = None
    if spec.objective == "ce":
        c = O.corrupt(rows, spec, special, noise=O.draw_noise(rows, 1e-3, generators=[
            torch.Generator().manual_seed(7 + j) for j in range(3)]))
        with torch.no_grad():
            logits = model(input_ids=c.noisy_ids).logits
            theirs = nemo_strategy.MDLMStrategy().create_loss_fn({})(
                logits=logits, target_ids=c.clean_ids, noise_mask=c.masked, p_mask=c.p[:, None].expand_as(c.masked),
                loss_mask=c.masked | (torch.arange(14)[None] >= c.prompt_lengths[:, None]), num_diffusion_tokens=40)
            mine, _ = O.objective_loss(logits, c, denominators={"rows": 3.0, "tokens": 40.0})
        ce_check = [float(theirs.total_loss), float(mine)]
    return {"options": options, "nemo": nemo_losses, "ours": ours, "same_grads": same_grads, "ce_check": ce_check}


if __name__ == "__main__":
    cases = [{}, {"objective": "ctc", "slack_insertion": "random", "slack_rate": 0.3},
             {"objective": "ce+ctc", "ctc_weight": 0.25, "slack_insertion": "probe", "slack_rate": 1.0},
             {"objective": "ctc", "ctc_canvas": "slack", "ctc_max_shift": 2}, {"objective": "ce"}]
    print(json.dumps([run(case) for case in cases]))
    sys.stdout.flush()
