"""Issue 23, part 2: routers and gates are found by what the forward does with their output (it chooses experts, or
it scales another matrix's output), never by their width: with a hidden size equal to the expert count, attention
and shared-expert matrices are pruned and the real router stays dense and unchanged."""
from __future__ import annotations

import pytest
import torch

from pyprune import PruneConfig
from pyprune.models import prune_model
from pyprune.models.discover import MatrixObserver, classify
from pyprune.models.pipeline import inspect_model, matrix_views

from .tiny import calibration, tiny_model

F = torch.nn.functional


def observed(block, x):
    observer = MatrixObserver(dict(block.named_parameters()))
    with torch.no_grad(), observer:
        block(x)
    return classify(block, observer.events, None, observer.routers)


class Toy(torch.nn.Module):
    """Every way a matrix's output is used here: chosen from (router), broadcast over another matrix's output
    (gate), multiplied elementwise with another (SwiGLU: no gate), broadcast against a parameter (Mamba's dt: no
    gate), normalised and reduced (no choice), and a matrix as wide as the expert count that chooses nothing."""

    def __init__(self, d=8, experts=4, choose="topk"):
        super().__init__()
        self.router = torch.nn.Linear(d, experts, bias=False)
        self.wide = torch.nn.Linear(d, experts, bias=False)   # as wide as the router, used as a plain projection
        self.back = torch.nn.Linear(experts, d, bias=False)
        self.gate_proj = torch.nn.Linear(d, 16, bias=False)
        self.up_proj = torch.nn.Linear(d, 16, bias=False)
        self.down_proj = torch.nn.Linear(16, d, bias=False)
        self.shared_gate = torch.nn.Linear(d, 1, bias=False)
        self.dt = torch.nn.Linear(d, d, bias=False)
        self.A = torch.nn.Parameter(torch.randn(d, 3))
        self.choose = choose

    def forward(self, x):
        scores = F.softmax(self.router(x).float(), dim=-1) + 0.1
        if self.choose == "topk":
            _, idx = torch.topk(scores, 2, dim=-1)
        elif self.choose == "max":
            _, idx = scores.max(dim=-1, keepdim=True)
        else:
            idx = torch.argsort(scores, dim=-1)[..., :2]
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        y = torch.sigmoid(self.shared_gate(x)) * y
        h = self.back(torch.relu(self.wide(x)))
        h = h / h.pow(2).mean(-1, keepdim=True).add(1).sqrt()
        decay = torch.exp(self.dt(x)[..., None] * self.A).sum(-1)
        return y + h + decay + idx.float().mean()


@pytest.mark.parametrize("choose", ["topk", "max", "argsort"])
def test_routers_and_gates_found_by_use(choose):
    found = observed(Toy(choose=choose), torch.randn(2, 5, 8))
    assert set(found.dense) == {"router", "shared_gate"}, found.dense
    assert found.dense["router"].startswith("router: its output chooses experts")
    assert found.dense["shared_gate"].startswith("gate:")
    pruned = {s.name for s in found.sites}
    assert pruned == {"wide", "back", "gate_proj", "up_proj", "down_proj", "dt"}, pruned


COLLIDING = {  # hidden size 64 = the expert count: q_proj, o_proj and the shared experts are 64 rows wide too
    "ernie4_5_moe": dict(num_experts=64, moe_num_shared_experts=1, moe_layer_start_index=0),
    "llama4_text": dict(num_local_experts=64),
}


@pytest.mark.parametrize("model_type", sorted(COLLIDING))
def test_shapes_that_collide_with_the_expert_count(model_type, rng):
    model = tiny_model(model_type, rng, moe_intermediate_size=16, intermediate_size=64, **COLLIDING[model_type])
    assert model.config.hidden_size == 64
    inspection = inspect_model(model)
    moe_blocks = [b for b in inspection.blocks if b.experts]
    assert moe_blocks and all(b.experts == 64 for b in moe_blocks)
    for b in moe_blocks:
        names = {n for g in b.groups for n, _ in g}
        rows = {n: s[0] for g in b.groups for n, s in g}
        assert len(b.dense) == 1, b.dense           # the router, and nothing else
        (router, why), = b.dense.items()
        assert why.startswith("router: its output chooses experts"), why
        collide = [n for n in names if "[" not in n and rows[n] == 64]
        assert any("q_proj" in n for n in collide) and any("o_proj" in n for n in collide), collide
        assert any("shared" in n for n in collide), collide

    views = matrix_views(model)
    path = inspection.blocks_path
    routers = {f"{path}.{b.index}.{name}" for b in moe_blocks for name in b.dense}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = calibration(rng, 4, 16)
    report = prune_model(model, ids, PruneConfig(method="wanda", sparsity="0.5"), device="cpu",
                         calibrate_all_experts=True)
    got = {r.name for r in report.layers}
    assert got == set(views)
    for b in moe_blocks:
        for kind in ("q_proj", "o_proj", "shared"):
            assert any(n.startswith(f"{path}.{b.index}.") and kind in n for n in got), kind
    after = dict(model.named_parameters())
    for r in routers:
        key = r + ".weight"
        assert torch.equal(after[key], before[key]), f"router {r} changed"
        assert not any(n == r for n in got)
    for r in report.layers:
        assert r.sparsity >= 0.5, r.name


class Scores(torch.nn.Module):
    """Attention-like scores with as many elements as the query (sequence length = width), reduced with a max over a
    dimension: no router, whatever the shapes."""

    def __init__(self, d=8):
        super().__init__()
        self.q_proj = torch.nn.Linear(d, d, bias=False)
        self.k_proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        scores = torch.matmul(self.q_proj(x), self.k_proj(x).transpose(-1, -2))
        return scores - scores.max(dim=-1, keepdim=True).values


def test_a_choice_after_a_product_that_mixes_is_no_router():
    x = torch.randn(2, 8, 8)  # seqlen 8 = width 8: q @ k^T has as many elements as q
    found = observed(Scores(), x)
    assert not found.dense and {s.name for s in found.sites} == {"q_proj", "k_proj"}
