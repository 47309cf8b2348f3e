"""The sequential block driver on a CUDA device (skipped without one): the same model pruned on the GPU (Hessians,
masks and solves by the CUDA kernels) and on the CPU (C++ ops) must give the same masks up to ties and rounding,
the same layer losses to float32 accuracy, and leave the model on the CPU where it started.

Block 0 sees identical inputs on both devices, so its pruned weights must agree closely too. Later blocks see the
outputs of differently rounded pruned blocks: on an H200, a 2:4 llama's block-1 down_proj weights differed by 10%
(relative norm: about 2% of the N:M groups flipped) while its loss agreed to 2%, so only losses and masks are
compared there."""
from __future__ import annotations

import copy

import pytest
import torch

from pyprune import PruneConfig
from pyprune.models import prune_model
from pyprune.models.pipeline import matrix_views

from .tiny import calibration, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("model_type,sparsity", [("llama", "0.5"), ("llama", "2:4"), ("mamba", "0.5"),
                                                 ("mixtral", "2:4")])
def test_cuda_driver_matches_cpu(model_type, sparsity, rng):
    wide = (dict(hidden_size=256, intermediate_size=512) if model_type in ("llama", "mixtral")
            else dict(hidden_size=256))
    model = tiny_model(model_type, rng, **wide)
    ids = calibration(rng, nsamples=8, seqlen=64)
    cfg = PruneConfig(method="joint", sparsity=sparsity, block_size=128)
    m_cpu, m_gpu = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(progress=False, calibrate_all_experts=True)  # MoE: every expert has a full-rank Hessian
    rep_cpu = prune_model(m_cpu, ids, cfg, device="cpu", **kw)
    rep_gpu = prune_model(m_gpu, ids, cfg, device="cuda", **kw)
    assert all(p.device.type == "cpu" for p in m_gpu.parameters()), "the driver must move blocks back"
    loss_cpu = {r.name: r.loss for r in rep_cpu.layers}
    loss_gpu = {r.name: r.loss for r in rep_gpu.layers}
    assert loss_cpu.keys() == loss_gpu.keys() and loss_cpu
    for name in loss_cpu:
        assert loss_gpu[name] == pytest.approx(loss_cpu[name], rel=2e-2, abs=1e-6), name
    p_cpu, p_gpu = matrix_views(m_cpu), matrix_views(m_gpu)  # expert matrices too
    block0 = {r.name for r in rep_cpu.layers if r.block == 0}
    for name in loss_cpu:
        w_cpu, w_gpu = p_cpu[name], p_gpu[name]
        agree = ((w_cpu == 0) == (w_gpu == 0)).double().mean().item()
        assert agree >= 0.97, f"{name}: masks agree on {agree:.4f} of the weights"
        if name in block0:
            rel = ((w_cpu - w_gpu).norm() / w_cpu.norm()).item()
            assert rel < 0.1, f"{name}: block-0 weights differ by {rel:.3g} (relative)"
