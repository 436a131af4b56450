"""``backend="auto"`` between the two GPU lattices (``mdlm_ctc.lattice_cost``): the calibrated cost models decide
until GPU measurements for a shape's class replace them; the rule reads host values only, and under
``torch.compile`` falls back to the shape-free rule. No GPU is touched: availability and the SM count are
stubbed."""

import pytest
import torch

from mdlm_ctc import backends, lattice_cost
from mdlm_ctc.reference import PRESERVE, STANDARD

pytest.importorskip("triton")

# (B, T, table width, mode) of SPEC §6, and the lattice the calibrated models pick (README, backends.resolve)
SPEC = {"G1": ((8, 2048, 257, PRESERVE), "triton"), "G2-preserve": ((8, 2048, 1024, PRESERVE), "cuda"),
        "G2-standard": ((8, 2048, 1024, STANDARD), "cuda"), "G3": ((2, 8192, 513, PRESERVE), "triton")}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_the_models_pick_the_documented_lattice(name):
    shape, expected = SPEC[name]
    choice, why = lattice_cost.gpu_lattice(*shape, n_sm=132)
    assert choice == expected and why.startswith("predicted"), why


def test_g2_standard_is_priced_from_the_instruction_counts():
    """The SFU-only model said 0.85 ms for G2 standard's Triton lattice; the instruction counts say ~4 ms."""
    B, T, W, mode = SPEC["G2-standard"][0]
    assert 3000 < lattice_cost.triton_lattice_us(B, T, W, mode) < 6000
    assert lattice_cost.cuda_lattice_us(B, T, W, mode) < lattice_cost.triton_lattice_us(B, T, W, mode)


def test_measurements_replace_the_models_for_their_class(monkeypatch):
    monkeypatch.setattr(lattice_cost, "MEASURED_LATTICE_US", {(STANDARD, 8, 2048, 1024): {"triton": 400.0,
                                                                                        "cuda": 900.0}})
    assert lattice_cost.gpu_lattice(8, 2048, 1024, STANDARD) == ("triton", "measured")
    assert lattice_cost.gpu_lattice(8, 2048, 900, STANDARD) == ("triton", "measured")  # the same class
    assert lattice_cost.gpu_lattice(8, 2048, 1024, PRESERVE)[1].startswith("predicted")  # another mode
    assert lattice_cost.gpu_lattice(8, 8192, 1024, STANDARD)[1].startswith("predicted")  # 4x the frames


@pytest.fixture
def both_gpu_backends(monkeypatch):
    monkeypatch.setattr(backends, "available_backends", lambda device=None: ["reference", "triton", "cuda"])
    monkeypatch.setattr(backends, "_sm_count", lambda device: 132)
    backends._gpu_lattice_cached.cache_clear()
    yield
    backends._gpu_lattice_cached.cache_clear()


def test_auto_follows_the_rule_per_shape(both_gpu_backends):
    cuda = torch.device("cuda")
    for shape, expected in SPEC.values():
        assert backends.resolve("auto", cuda, shape) == expected
    assert backends.resolve("auto", cuda) == "triton"  # no shape: the shape-free rule
    assert backends.resolve("cuda", cuda, SPEC["G1"][0]) == "cuda"  # an explicit backend is kept


def test_auto_without_the_cuda_lattice_is_triton(monkeypatch):
    monkeypatch.setattr(backends, "available_backends", lambda device=None: ["reference", "triton"])
    assert backends.resolve("auto", torch.device("cuda"), SPEC["G2-standard"][0]) == "triton"


def test_auto_under_torch_compile_uses_the_shape_free_rule(both_gpu_backends):
    def pick(x):
        return x + 1 if backends.resolve("auto", torch.device("cuda"), (x.shape[0], 2048, 1024, STANDARD)) == "cuda" \
            else x - 1

    compiled = torch.compile(pick, backend="eager", fullgraph=True)
    assert pick(torch.zeros(8)).eq(1).all()  # eager: the model's cuda
    assert compiled(torch.zeros(8)).eq(-1).all()  # traced: triton
