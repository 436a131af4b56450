"""A minimal stand-in of the nemo-automodel 0.7.0 dLLM interface the slack_ctc strategy plugs into.

Only what ``mdlm_ctc.mdlm.nemo`` and ``tests/nemo_recipe_check.py`` touch, written from NeMo's
documented interface (``nemo_automodel/recipes/dllm/strategy.py`` and ``train_ft.py`` of 0.7.0):

* ``strategy``: the ``DLLMStrategy`` ABC (``create_loss_fn``, ``apply_corruption`` with a per-row
  ``generator``, ``prepare_batch`` abstract; ``pre_step``, ``forward_backward``, ``setup_extra``,
  ``normalization_mode`` with their defaults), ``MDLMStrategy`` with NeMo's MDLM cross-entropy
  (sum over corrupted supervised positions of CE / p, divided by the step's token count),
  ``DLLM_STRATEGIES`` and ``get_dllm_strategy``;
* ``train_ft``: ``corruption_sample_seed`` and the three recipe methods that run a micro-batch:
  ``_apply_corruption`` (one generator per row, seeded by the row's global index),
  ``_augment_batch_for_model`` and ``_forward_backward_step`` (the stashed corruption, ``prepare_batch``,
  the model, the loss call with NeMo's keyword arguments, backward scaled by the data-parallel size).

``install(monkeypatch)`` puts the modules into ``sys.modules`` under NeMo's names.
"""

import sys
import types
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ strategy.py
class DLLMLossOutput(NamedTuple):
    total_loss: torch.Tensor
    dllm_loss: torch.Tensor


class MDLMCrossEntropyLoss(torch.nn.Module):
    def forward(self, logits, target_ids, noise_mask, p_mask, loss_mask, loss_mask_ar=None, num_diffusion_tokens=None,
                num_ar_tokens=None, causal_logits=None, noisy_input_ids=None):
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), target_ids, reduction="none")
        mask = noise_mask & loss_mask.bool()
        loss = (token_nll * mask.float() / p_mask.clamp(min=1e-8)).sum()
        if num_diffusion_tokens is not None:
            loss = loss / max(num_diffusion_tokens, 1)
        return DLLMLossOutput(loss, loss.detach().clone())


def corrupt_uniform(input_ids, loss_mask, mask_token_id, eps=1e-3, generator=None):
    B, L = input_ids.shape
    t = torch.rand((B,), device=input_ids.device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, L)
    noise_mask = (torch.rand((B, L), device=input_ids.device, generator=generator) < p_mask) & loss_mask.bool()
    return torch.where(noise_mask, mask_token_id, input_ids), noise_mask, p_mask.float()


class DLLMStrategy(ABC):
    @property
    def normalization_mode(self):
        return "supervised"

    @property
    def loss_log_key(self):
        return "dllm_loss"

    @abstractmethod
    def create_loss_fn(self, dllm_cfg):
        """The loss module."""

    def setup_extra(self, recipe):
        pass

    def pre_step(self, recipe, batches):
        num_noise = num_supervised = 0
        for microbatch_idx, batch in enumerate(batches):
            noisy, noise_mask, p_mask = recipe._apply_corruption(batch["input_ids"], batch["loss_mask"],
                                                                 microbatch_idx=microbatch_idx)
            batch["_noisy_input_ids"], batch["_noise_mask"], batch["_p_mask"] = noisy, noise_mask, p_mask
            batch["_clean_input_ids"] = batch["input_ids"].clone()
            num_noise += int(noise_mask.sum().item())
            num_supervised += int(batch["loss_mask"].sum().item())
        return num_noise, num_supervised

    def forward_backward(self, recipe, idx, batch, *, loss_buffer, num_diffusion_tokens, num_ar_tokens=None,
                         num_batches, is_train=True):
        recipe._forward_backward_step(idx, batch, loss_buffer=loss_buffer, num_diffusion_tokens=num_diffusion_tokens,
                                      num_ar_tokens=num_ar_tokens, num_batches=num_batches, is_train=is_train)

    @abstractmethod
    def apply_corruption(self, input_ids, loss_mask, mask_token_id, *, eps, block_size, half_life_ratio,
                         generator=None):
        """(noisy_input_ids, noise_mask, p_mask)."""

    @abstractmethod
    def prepare_batch(self, batch, noisy_input_ids, noise_mask, clean_input_ids):
        """The model's inputs."""


class MDLMStrategy(DLLMStrategy):
    def create_loss_fn(self, dllm_cfg):
        return MDLMCrossEntropyLoss()

    def apply_corruption(self, input_ids, loss_mask, mask_token_id, *, eps, block_size, half_life_ratio,
                         generator=None):
        return corrupt_uniform(input_ids, loss_mask, mask_token_id, eps=eps, generator=generator)

    def prepare_batch(self, batch, noisy_input_ids, noise_mask, clean_input_ids):
        batch["input_ids"] = noisy_input_ids
        batch.pop("attention_mask", None)
        return batch


DLLM_STRATEGIES = {"mdlm": MDLMStrategy}


def get_dllm_strategy(mode):
    cls = DLLM_STRATEGIES.get(mode)
    if cls is None:
        raise ValueError(f"Unknown dllm.mode: {mode!r}. Available: {sorted(DLLM_STRATEGIES)}")
    return cls()


# ------------------------------------------------------------------------------ train_ft.py
def corruption_sample_seed(base_seed, step, dp_rank, dp_size, local_batch_size, grad_acc_steps, microbatch_idx,
                           offset):
    gbs = local_batch_size * dp_size * grad_acc_steps
    index = step * gbs + dp_rank + (microbatch_idx * local_batch_size + offset) * dp_size
    return (base_seed + (2 << 42) + 2654435761 * index) & ((1 << 63) - 1)


class DiffusionLMSFTRecipe:
    def _apply_corruption(self, input_ids, loss_mask, microbatch_idx=0):
        bsz = int(input_ids.size(0))
        parts = []
        for j in range(bsz):
            seed = corruption_sample_seed(int(getattr(self, "_self_cond_base_seed", 42)), int(self.step_scheduler.step),
                                          0, 1, bsz, int(self.step_scheduler.grad_acc_steps), microbatch_idx, j)
            gen = torch.Generator(device=input_ids.device).manual_seed(seed)
            parts.append(self.dllm_strategy.apply_corruption(
                input_ids[j:j + 1], loss_mask[j:j + 1], self.mask_token_id, eps=self.dllm_eps,
                block_size=self.dllm_block_size, half_life_ratio=self.dllm_half_life_ratio, generator=gen))
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    def _augment_batch_for_model(self, batch, *, clean_input_ids, loss_mask):
        return batch

    def _forward_backward_step(self, idx, batch, *, loss_buffer, num_diffusion_tokens, num_ar_tokens=None,
                               num_batches, is_train=True):
        device = self.dist_env.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if "_noise_mask" in batch:
            noisy, noise_mask = batch.pop("_noisy_input_ids"), batch.pop("_noise_mask")
            p_mask, clean = batch.pop("_p_mask"), batch.pop("_clean_input_ids")
            loss_mask = batch.pop("loss_mask")
        else:
            loss_mask = batch.pop("loss_mask")
            clean = batch["input_ids"].clone()
            noisy, noise_mask, p_mask = self._apply_corruption(clean, loss_mask, microbatch_idx=idx)
        batch = self.dllm_strategy.prepare_batch(batch, noisy, noise_mask, clean)
        batch = self._augment_batch_for_model(batch, clean_input_ids=clean, loss_mask=loss_mask)
        out = self.model_parts[0](**batch)
        result = self.dllm_loss_fn(logits=out.logits, target_ids=clean, noise_mask=noise_mask, p_mask=p_mask,
                                   loss_mask=loss_mask, loss_mask_ar=None, num_diffusion_tokens=num_diffusion_tokens,
                                   num_ar_tokens=None, causal_logits=None, noisy_input_ids=noisy)
        loss_buffer.append(result.total_loss.clone().detach())
        self._dllm_loss_buffer.append(result.dllm_loss.detach().clone())
        if is_train:
            (result.total_loss * self._get_dp_group_size(include_cp=True)).backward()


def install(monkeypatch):
    """The stand-in modules under NeMo's module names."""
    strategy = types.ModuleType("nemo_automodel.recipes.dllm.strategy")
    train_ft = types.ModuleType("nemo_automodel.recipes.dllm.train_ft")
    here = sys.modules[__name__]
    for name in ("DLLMLossOutput", "MDLMCrossEntropyLoss", "corrupt_uniform", "DLLMStrategy", "MDLMStrategy"):
        setattr(strategy, name, getattr(here, name))
    registry = strategy.DLLM_STRATEGIES = dict(DLLM_STRATEGIES)  # a fresh registry per test

    def get(mode):
        if mode not in registry:
            raise ValueError(f"Unknown dllm.mode: {mode!r}. Available: {sorted(registry)}")
        return registry[mode]()

    strategy.get_dllm_strategy = get
    train_ft.corruption_sample_seed = corruption_sample_seed
    train_ft.DiffusionLMSFTRecipe = DiffusionLMSFTRecipe
    dllm = types.ModuleType("nemo_automodel.recipes.dllm")
    dllm.strategy, dllm.train_ft = strategy, train_ft
    recipes = types.ModuleType("nemo_automodel.recipes")
    recipes.dllm = dllm
    root = types.ModuleType("nemo_automodel")
    root.recipes = recipes
    for name, module in (("nemo_automodel", root), ("nemo_automodel.recipes", recipes),
                         ("nemo_automodel.recipes.dllm", dllm), ("nemo_automodel.recipes.dllm.strategy", strategy),
                         ("nemo_automodel.recipes.dllm.train_ft", train_ft)):
        monkeypatch.setitem(sys.modules, name, module)
    return strategy
