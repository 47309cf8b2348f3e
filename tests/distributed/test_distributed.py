"""Distributed pruning (``pyprune.distributed``) with the gloo backend on CPU processes: 2 and 3 ranks on a tiny
Llama with an odd number of calibration samples (uneven shards). Reduced Hessians, final weights, masks and reports
equal the single-process ones, on every rank; row-split solves equal unsplit ones."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from pyprune.algorithms import prune_layer
from pyprune.config import PruneConfig
from pyprune.distributed import plan_units, prune_rows, row_split_exact, shard_bounds, shard_samples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED, NSAMPLES, SEQLEN = 1234, 5, 16
CONFIGS = {  # name -> (PruneConfig kwargs, prune_model kwargs)
    "joint24": (dict(method="joint", sparsity="2:4", block_size=16), {}),
    "sparsegpt50": (dict(method="sparsegpt", sparsity=0.5, block_size=16), {}),
    "wanda_ts": (dict(method="wanda", sparsity=0.5), dict(true_sequential=True)),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    from ..models.tiny import calibration, tiny_model
    g = torch.Generator().manual_seed(SEED)
    model = tiny_model("llama", g, layers=2)
    return model, calibration(g, NSAMPLES, SEQLEN)


def _block0_hessians(model, calib, comm=None):
    """The reduced Hessians of block 0's groups, collected as the driver does (keyed by the group's first matrix)."""
    from pyprune.models.capture import capture_inputs
    from pyprune.models.discover import find_blocks
    from pyprune.models.driver import as_batches, observe_block
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, as_batches(calib), torch.device("cpu"))
    obs = observe_block(blocks[0], inputs, 0, collect=lambda s: True)
    out = {}
    for slot in obs.slots:
        H, n = (slot.H, slot.n) if comm is None else comm.reduce_hessian(slot.H, slot.n)
        out[slot.sites[0].name] = (H.clone(), n)
    return out


class _Killed(Exception):
    pass


def _kill_after_block_0(i, reports):
    if i == 0:
        raise _Killed


def _stream(src: str, out: str, calib, comm=None, kill: bool = False):
    from pyprune.models.streaming import prune_checkpoint
    cfg = PruneConfig(method="joint", sparsity="2:4", block_size=16)
    rep = prune_checkpoint(src, out, calib, cfg, comm=comm, on_block_done=_kill_after_block_0 if kill else None)
    return [(r.name, r.loss, r.sparsity, r.samples) for r in rep.layers]


def _worker(out_dir: str, split_rows_min: int, stream_src: str | None = None) -> None:
    """One rank (run in a subprocess with torchrun's variables): reduced Hessians and distributed prune results
    (in memory; streamed from ``stream_src`` with a kill after block 0 and a resume); rank 0 also computes the
    single-process references."""
    import dataclasses
    torch.set_num_threads(1)
    from pyprune.distributed import init_from_env
    from pyprune.models.driver import prune_model
    comm = init_from_env(timeout_s=60)
    comm = dataclasses.replace(comm, min_split_rows=split_rows_min)
    try:
        model, calib = _setup()
        res = {"hessians": _block0_hessians(model, shard_samples(calib, comm), comm), "pruned": {}}
        for name, (ckw, mkw) in CONFIGS.items():
            model, calib = _setup()
            rep = prune_model(model, shard_samples(calib, comm), PruneConfig(**ckw), device="cpu", comm=comm, **mkw)
            res["pruned"][name] = ({k: v.clone() for k, v in model.state_dict().items()},
                                   [(r.name, r.loss, r.sparsity, r.samples) for r in rep.layers],
                                   rep.settings["nsamples"])
        if stream_src:
            _, calib = _setup()
            dst = os.path.join(out_dir, "streamed")
            with pytest.raises(_Killed):
                _stream(stream_src, dst, shard_samples(calib, comm), comm, kill=True)
            assert os.path.isfile(os.path.join(dst, ".pyprune-partial", "state.json"))
            comm.barrier()
            res["stream"] = _stream(stream_src, dst, shard_samples(calib, comm), comm)  # resumes after block 0
        if comm.rank == 0:
            model, calib = _setup()
            ref = {"hessians": _block0_hessians(model, calib), "pruned": {}}
            if stream_src:
                ref["stream"] = _stream(stream_src, os.path.join(out_dir, "stream_ref"), calib)
            for name, (ckw, mkw) in CONFIGS.items():
                model, calib = _setup()
                rep = prune_model(model, calib, PruneConfig(**ckw), device="cpu", **mkw)
                ref["pruned"][name] = ({k: v.clone() for k, v in model.state_dict().items()},
                                       [(r.name, r.loss, r.sparsity, r.samples) for r in rep.layers],
                                       rep.settings["nsamples"])
            torch.save(ref, os.path.join(out_dir, "reference.pt"))
        torch.save(res, os.path.join(out_dir, f"rank{comm.rank}.pt"))
        comm.barrier()  # leave together (rank 0 computes the references alone first)
    finally:
        comm.close()


def _launch(world: int, out_dir: str, split_rows_min: int = 64, stream_src: str | None = None,
            timeout: float = 150.0) -> None:
    _run_ranks(world, f"from tests.distributed.test_distributed import _worker; "
               f"_worker({str(out_dir)!r}, {split_rows_min}, {stream_src!r})", timeout)


def _run_ranks(world: int, code: str, timeout: float = 150.0) -> None:
    """Run the Python ``code`` in ``world`` gloo processes (RANK 0..world-1 on a free local port); fails the test
    with each failing rank's output tail."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": ROOT, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(i, p.returncode, o[-3000:]) for i, (p, o) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    assert not bad, f"ranks failed: {bad}"


def _same_weights(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Same masks and weights within float rounding, up to near-ties: the Hessian summed over ranks differs from the
    one-process Hessian in rounding, which may flip a mask choice whose two options cost the same to a few ulps (one
    2:4 group of 1024 in a tiny llama's o_proj did). At most 1% of the rows may differ in their mask; every other row
    must match."""
    rows_a, rows_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    same = ((rows_a == 0) == (rows_b == 0)).all(dim=1)
    assert (~same).sum().item() <= max(1, rows_a.shape[0] // 100), f"{name}: masks differ in {(~same).sum()} rows"
    torch.testing.assert_close(rows_a[same], rows_b[same], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _same_checkpoints(dir_a, dir_b) -> None:
    """Same tensors, same masks (exact zeros, up to near-ties), weights within float rounding."""
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(dir_a) if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(dir_b) if f.endswith(".safetensors"))
    for f in files:
        a, b = load_file(os.path.join(dir_a, f)), load_file(os.path.join(dir_b, f))
        assert a.keys() == b.keys()
        for k in a:
            _same_weights(a[k], b[k], k)


def _check(out_dir, world: int) -> None:
    ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=False)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for res in ranks:
        for name, (H_ref, n_ref) in ref["hessians"].items():
            H, n = res["hessians"][name]
            assert n == n_ref == NSAMPLES * SEQLEN
            torch.testing.assert_close(H, H_ref, rtol=1e-5, atol=1e-6 * float(H_ref.abs().max()))
    for cfg in CONFIGS:
        sd_ref, layers_ref, nsamples_ref = ref["pruned"][cfg]
        sd0, layers0, _ = ranks[0]["pruned"][cfg]
        for res in ranks:  # every rank: bit-identical weights and identical reports
            sd, layers, nsamples = res["pruned"][cfg]
            assert nsamples == nsamples_ref == NSAMPLES
            assert layers == layers0
            for k in sd0:
                assert torch.equal(sd[k], sd0[k]), (cfg, k)
        assert [(n, s) for n, _, _, s in layers0] == [(n, s) for n, _, _, s in layers_ref]
        for (_, loss, sp, _), (_, loss_ref, sp_ref, _) in zip(layers0, layers_ref):
            assert loss == pytest.approx(loss_ref, rel=1e-3, abs=1e-6) and sp == pytest.approx(sp_ref, abs=1e-6)
        for k, v in sd_ref.items():  # same masks, weights within float rounding
            assert torch.equal(sd0[k] == 0, v == 0), (cfg, k)
            torch.testing.assert_close(sd0[k], v, rtol=1e-4, atol=1e-5)


def test_two_ranks_equal_single_process(tmp_path):
    """In memory and streamed (killed after block 0, resumed): equal to one process; rank 0 alone writes."""
    from ..models.tiny import save_tiny_dir
    src = save_tiny_dir(_setup()[0], str(tmp_path / "src"), tokenizer=False)
    _launch(2, tmp_path, stream_src=src)
    _check(tmp_path, 2)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    ref = torch.load(os.path.join(tmp_path, "reference.pt"), weights_only=False)
    assert ranks[0]["stream"] == ranks[1]["stream"]
    assert [(n, s) for n, _, _, s in ranks[0]["stream"]] == [(n, s) for n, _, _, s in ref["stream"]]
    _same_checkpoints(tmp_path / "streamed", tmp_path / "stream_ref")
    assert not os.path.exists(tmp_path / "streamed" / ".pyprune-partial")


def test_three_ranks_with_row_splits_equal_single_process(tmp_path):
    _launch(3, tmp_path, split_rows_min=8)  # small modules split into row ranges on several ranks
    _check(tmp_path, 3)


# ----------------------------------------------------------------------------------------- in-process pieces
def test_shards_cover_samples_unevenly():
    from pyprune.distributed import Comm
    calib = torch.arange(7 * 3).reshape(7, 3)
    parts = [shard_samples(calib, Comm(r, 3, torch.device("cpu"))) for r in range(3)]
    assert [p.shape[0] for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat(parts), calib)
    with pytest.raises(ValueError, match="at least one sample per rank"):
        shard_samples(calib[:2], Comm(0, 3, torch.device("cpu")))


@pytest.mark.parametrize("world,split", [(1, True), (2, False), (3, True), (8, True)])
def test_plan_covers_every_row_once(world, split):
    shapes = [("q", 64, 64), ("k", 32, 64), ("gate", 512, 64), ("down", 64, 512)]
    units = plan_units(shapes, world, split, min_rows=16)
    assert {u.owner for u in units} <= set(range(world))
    for mi, (name, rows, _) in enumerate(shapes):
        mine = sorted((u.start, u.stop) for u in units if u.module == mi)
        assert mine[0][0] == 0 and mine[-1][1] == rows and all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
        if not split or world == 1:
            assert len(mine) == 1
    if split and world > 1:
        assert len(units) > len(shapes)  # the big module was split


@pytest.mark.parametrize("kw", [dict(method="joint", sparsity="2:4", block_size=32),
                                dict(method="sparsegpt", sparsity=0.5, mask_scope="row", block_size=32),
                                dict(method="joint", sparsity=0.5, mask_scope="row", block_size=32),
                                dict(method="wanda", sparsity="4:8")])
def test_row_split_equals_unsplit(rng, kw):
    config = PruneConfig(**kw)
    assert row_split_exact(config)
    W = torch.randn(48, 64, generator=rng)
    X = torch.randn(256, 64, generator=rng) * torch.rand(64, generator=rng)
    H = 2 * X.T @ X / X.shape[0]
    whole = prune_layer(W, H, config)
    bounds = [shard_bounds(48, r, 3) for r in range(3)]
    weight, mask, loss = prune_rows(W, H, config, bounds)
    assert torch.equal(mask, whole.mask)
    torch.testing.assert_close(weight, whole.weight, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(whole.loss, rel=1e-5)


def test_block_scope_is_not_split():
    assert not row_split_exact(PruneConfig(method="joint", sparsity=0.5, mask_scope="block"))
    assert not row_split_exact(PruneConfig(method="sparsegpt", sparsity=0.5))  # SparseGPT's default: per block
    assert not row_split_exact(PruneConfig(method="magnitude", sparsity=0.5))
    assert row_split_exact(PruneConfig(method="joint", sparsity=0.5))  # the joint default is per row


# ---------------------------------------------------------------------------------------------------------- CLI
def test_torchrun_cli_equals_single_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m pyprune prune ...``, in memory and streamed: rank 0 writes the output and
    prints the summary; the pruned weights equal the one-process CLI's."""
    from ..cli.test_cli import WORDS
    from ..models.tiny import save_tiny_dir, tiny_model
    g = torch.Generator().manual_seed(SEED)
    model_dir = save_tiny_dir(tiny_model("llama", g, layers=2), str(tmp_path / "model"))
    idx = torch.randint(0, len(WORDS), (800,), generator=g).tolist()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    args = [model_dir, "--method", "joint", "--sparsity", "2:4", "--calib-text", str(text), "--nsamples", "3",
            "--seqlen", "32", "--block-size", "16", "--device", "cpu", "--threads", "1", "-q", "--json"]
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "pyprune", "prune", *args, "-o", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=150)
    assert one.returncode == 0, one.stderr[-3000:]
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pyprune", "prune", *args, "-o", str(tmp_path / "two")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150)
    assert dist.returncode == 0, (dist.stdout[-2000:], dist.stderr[-3000:])
    assert dist.stdout.count("pruned model written to") == 1  # rank 0 alone prints
    _same_checkpoints(tmp_path / "one", tmp_path / "two")
    streamed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "pyprune", "prune", *args, "--stream", "on", "-o", str(tmp_path / "three")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert streamed.returncode == 0, (streamed.stdout[-2000:], streamed.stderr[-3000:])
    assert streamed.stdout.count("pruned model written to") == 1
    from safetensors.torch import load_file
    one = {k: v for f in os.listdir(tmp_path / "one") if f.endswith(".safetensors")
           for k, v in load_file(str(tmp_path / "one" / f)).items()}
    three = {k: v for f in os.listdir(tmp_path / "three") if f.endswith(".safetensors")
             for k, v in load_file(str(tmp_path / "three" / f)).items()}
    assert one.keys() == three.keys()
    for k in one:
        _same_weights(one[k], three[k], k)
    import json
    with open(tmp_path / "two" / "pyprune_report.json") as fh:
        settings = json.load(fh)["settings"]
    assert settings["world_size"] == 2 and settings["nsamples"] == 3


def test_torchrun_moe_equals_single_process(tmp_path):
    """A MoE model on 2 ranks (each rank's tokens reach other experts): every expert's Hessian is reduced over the
    ranks in one order on every rank, experts one rank never saw join with an empty one, and the result equals the
    one-process run up to near-tie masks, in memory and streamed."""
    from ..cli.test_cli import WORDS
    from ..models.tiny import save_tiny_dir, tiny_model
    g = torch.Generator().manual_seed(SEED)
    model_dir = save_tiny_dir(tiny_model("mixtral", g, layers=2), str(tmp_path / "model"))
    idx = torch.randint(0, len(WORDS), (800,), generator=g).tolist()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    # --swaps 0: experts that see a token or two have near-singular Hessians, so many exchanges are near-ties that the
    # summation order decides (with the default of 16, 4 of 128 rows of one expert differed); the other
    # distributed tests keep the default
    args = [model_dir, "--sparsity", "2:4", "--calib-text", str(text), "--nsamples", "4", "--seqlen", "32",
            "--block-size", "16", "--device", "cpu", "--threads", "1", "-q", "--expert-min-tokens", "1",
            "--swaps", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "pyprune", "prune", *args, "-o", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=150)
    assert one.returncode == 0, one.stderr[-3000:]
    for name, extra in (("two", []), ("streamed", ["--stream", "on"])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "pyprune", "prune", *args, *extra, "-o", str(tmp_path / name)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=150)
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    _same_checkpoints(tmp_path / "one", tmp_path / "two")
    from safetensors.torch import load_file
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    streamed = {k: v for f in os.listdir(tmp_path / "streamed") if f.endswith(".safetensors")
                for k, v in load_file(str(tmp_path / "streamed" / f)).items()}
    assert streamed.keys() == two.keys() and all(torch.equal(streamed[k], two[k]) for k in two)
