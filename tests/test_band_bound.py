"""``band_bound``: the band width without the validation sync (issue 11, item 4).

Without the sync (``validate=False``, ``torch.compile``) the lengths are not read on the host, so the
posterior table falls back to ``min(U_max, T)`` columns; a caller-given ``band_bound`` sizes it
instead, checked on the device. Oracles: the validated call (exact width) and the float64 reference.
"""

import pytest
import torch

import mdlm_ctc
from mdlm_ctc import _validation
from mdlm_ctc.reference import column_band_width, slack_ctc_reference
from oracles import assert_close_report

SLACK = 0


def case(seed=0):
    # T = 24, U = 20: the exact band is min(U, T - U + 1) = 5 (row 0), 4 (row 1: T_b = 22, U_b = 19)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 24, 9, generator=g, dtype=torch.float64)
    targets = torch.randint(1, 9, (2, 20), generator=g)
    return logits, targets, torch.tensor([24, 22]), torch.tensor([20, 19])


def backends():
    return [name for name in ("reference", "cpu", "triton") if name in mdlm_ctc.available_backends("cpu")]


def loss_and_grad(logits, targets, T_b, U_b, **kw):
    x = logits.clone().requires_grad_()
    nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, reduction="none", **kw)
    nll.sum().backward()
    return nll.detach(), x.grad


def table_width(logits, targets, T_b, U_b, **kw):
    return _validation.check_slack_ctc_args(logits, targets, U_b, SLACK, T_b, "preserve", None, None, "none", False,
                                            "auto", kw.pop("validate"), **kw).band_width


def test_width_without_the_sync():
    logits, targets, T_b, U_b = case()
    assert int(column_band_width(T_b, U_b).max()) == 5
    assert table_width(logits, targets, T_b, U_b, validate=True) == 5
    assert table_width(logits, targets, T_b, U_b, validate=False) == 20  # min(U_max, T): the fallback
    assert table_width(logits, targets, T_b, U_b, validate=False, band_bound=5) == 5
    assert table_width(logits, targets, T_b, U_b, validate=False, band_bound=64) == 20  # never wider than needed
    assert table_width(logits, targets, T_b, U_b, validate=True, band_bound=64) == 5


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unvalidated_with_a_bound_matches_validated(backend, dtype):
    logits, targets, T_b, U_b = case(1)
    logits = logits.to(dtype)
    want = loss_and_grad(logits, targets, T_b, U_b, backend=backend)
    got = loss_and_grad(logits, targets, T_b, U_b, backend=backend, validate=False, band_bound=5)
    assert_close_report(got[0], want[0], atol=0, rtol=0, what="loss")
    assert_close_report(got[1], want[1], atol=0, rtol=0, what="gradient")
    y = logits.double().requires_grad_()
    ref = slack_ctc_reference(y, targets, U_b, slack_id=SLACK, input_lengths=T_b)
    ref.sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close_report(got[0].double(), ref.detach(), atol=tol, rtol=tol, what="loss vs float64 reference")
    assert_close_report(got[1].double(), y.grad, atol=tol, rtol=tol, what="gradient vs float64 reference")


def test_compiled_with_a_bound_matches_eager():
    logits, targets, T_b, U_b = case(2)
    logits = logits.float()

    def loss(x):
        return mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, band_bound=5)

    x = logits.clone().requires_grad_()
    compiled = torch.compile(loss, backend="eager", fullgraph=True)(x)
    compiled.backward()
    y = logits.clone().requires_grad_()
    eager = loss(y)
    eager.backward()
    assert_close_report(compiled.detach(), eager.detach(), atol=0, rtol=0, what="compiled loss")
    assert_close_report(x.grad, y.grad, atol=0, rtol=0, what="compiled gradient")


def test_a_row_wider_than_the_bound_is_an_error():
    logits, targets, T_b, U_b = case(3)
    with pytest.raises(ValueError, match=r"`band_bound`=4 is smaller than the band width of row 0.* = 5"):
        mdlm_ctc.slack_ctc_loss(logits, targets, U_b, slack_id=SLACK, input_lengths=T_b, band_bound=4)
    # unvalidated: the device-side check (a RuntimeError on CPU tensors; a device assert on a GPU)
    with pytest.raises(RuntimeError, match=r"`band_bound`=4 is smaller than the band width of a row"):
        mdlm_ctc.slack_ctc_loss(logits, targets, U_b, slack_id=SLACK, input_lengths=T_b, band_bound=4,
                                validate=False)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                       ("5", TypeError)])
def test_bad_band_bound(bad, error):
    logits, targets, T_b, U_b = case()
    with pytest.raises(error, match="band_bound"):
        mdlm_ctc.slack_ctc_loss(logits, targets, U_b, slack_id=SLACK, input_lengths=T_b, band_bound=bad)


def test_module_passes_the_bound():
    logits, targets, T_b, U_b = case(4)
    module = mdlm_ctc.SlackCTCLoss(slack_id=SLACK, reduction="none", band_bound=4)
    with pytest.raises(ValueError, match="band_bound"):
        module(logits, targets, U_b, T_b)
