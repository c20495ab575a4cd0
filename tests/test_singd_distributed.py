"""SINGD under DistributedDataParallel on gloo processes: every rank ends with the same parameters, equal
to the single-process run on the global batch, and the statistics travel in structured form."""

import os

import pytest
import torch
from distributed import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

STEPS = 3
GLOBAL_BATCH = 8
HP = dict(lr=0.05, momentum=0.9, damping=5e-2, alpha1=0.5, weight_decay=1e-3, T=1, lr_cov=0.05)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def global_batches(sequence: bool):
    gen = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, 4, 5) if sequence else (GLOBAL_BATCH, 5)
    return [(torch.randn(*shape, generator=gen, dtype=torch.float64),
             torch.randn(*shape[:-1], 3, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def train(model, opt, data, rank=0, world=1):
    for x, y in data:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        (model(x) - y).square().sum(-1).mean().backward()  # the mean over the local batch (x sequence)
        opt.step()


CASES = [
    (("dense", "dense"), "batch", False),
    (("triltoeplitz", "block2diagonal"), "batch", False),
    (("hierarchical2_2", "diagonal"), "batch+sequence", True),
]


def _worker(rank, world):
    """Every case in this process (starting gloo processes costs more than the cases)."""
    os.environ["KFOPT_BACKEND"] = "torch"
    from kfopt import singd
    from kfopt.singd import SINGD

    sent = []
    average = singd.collectives.all_reduce_average_async

    def spy(tensors, *args, **kwargs):
        sent[-1].append(sum(t.numel() for t in tensors))
        return average(tensors, *args, **kwargs)

    singd.collectives.all_reduce_average_async = spy
    results = []
    for structures, loss_average, sequence in CASES:
        sent.append([])
        model = make_model()
        ddp = DistributedDataParallel(model)
        opt = SINGD(ddp, structures=structures, loss_average=loss_average, **HP)
        train(ddp, opt, global_batches(sequence), rank, world)
        factors = [f.to_dense() for name in opt.layers for f in opt.factors(name)]
        results.append(([p.detach() for p in model.parameters()], factors, sent[-1]))
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_agree_and_equal_the_global_batch_run(monkeypatch):
    """Cases: dense; Toeplitz and block-diagonal; hierarchical and diagonal on sequences ("batch+sequence")."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    from kfopt.singd import SINGD
    from kfopt.structures import parse_structure

    rank0, rank1 = run_distributed(_worker, 2, timeout=120.0)
    for (structures, loss_average, sequence), (params0, factors0, sent0), (params1, factors1, _) in zip(
            CASES, rank0, rank1):
        single = make_model()
        opt = SINGD(single, structures=structures, loss_average=loss_average, **HP)
        train(single, opt, global_batches(sequence))
        want_factors = [f.to_dense() for name in opt.layers for f in opt.factors(name)]
        for p, q in zip(params0 + factors0, params1 + factors1):
            assert torch.equal(p, q), f"{structures}: ranks disagree"
        for p, q in zip(params0 + factors0, [p.detach() for p in single.parameters()] + want_factors):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), f"{structures}: differs from the global batch"
        # one all-reduce per step of the structures' free parameters (K and C of each layer), not d x d
        compact = sum(torch.Size(shape).numel() for d_k, d_c in ((6, 7), (8, 3))
                      for spec, side in ((parse_structure(structures[0]), d_k),
                                         (parse_structure(structures[1]), d_c))
                      for shape in spec.shapes(side))
        assert sent0 == [compact] * STEPS, structures
