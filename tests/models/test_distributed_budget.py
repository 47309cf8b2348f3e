"""Issue 23, part 5: distributed runs keep the Hessian budget. The ranks take the least of their budgets and plan
each block's passes from its structure, the same on every rank; two ranks with a budget of one Hessian at a time
equal one process with that budget (one group per pass over the partly pruned block), which differs from a run
without a budget."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from ..cli.test_cli import WORDS
from ..distributed.test_distributed import ROOT, SEED, _same_checkpoints
from .tiny import save_tiny_dir, tiny_model


def test_two_ranks_keep_the_hessian_budget(tmp_path):
    g = torch.Generator().manual_seed(SEED)
    model_dir = save_tiny_dir(tiny_model("qwen2_moe", g, layers=2), str(tmp_path / "model"))
    idx = torch.randint(0, len(WORDS), (800,), generator=g).tolist()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    args = [model_dir, "--sparsity", "2:4", "--calib-text", str(text), "--nsamples", "4", "--seqlen", "32",
            "--block-size", "16", "--device", "cpu", "--threads", "1", "-q", "--expert-min-tokens", "1",
            "--calibrate-all-experts", "--swaps", "0"]
    budget = ["--hessian-budget", "0.000001"]  # about 1 KB: one group's Hessian per pass
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    runs = {"one": [sys.executable, "-m", "pyprune", "prune", *args, *budget],
            "nobudget": [sys.executable, "-m", "pyprune", "prune", *args, "--hessian-budget", "none"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "pyprune", "prune", *args, *budget]}
    for name, cmd in runs.items():
        run = subprocess.run([*cmd, "-o", str(tmp_path / name)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, (name, run.stdout[-2000:], run.stderr[-3000:])
    _same_checkpoints(tmp_path / "one", tmp_path / "two")
    from safetensors.torch import load_file
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    nob = load_file(str(tmp_path / "nobudget" / "model.safetensors"))
    assert not all(torch.equal(one[k], nob[k]) for k in one)  # the budget made passes over the pruned block
    import json
    with open(tmp_path / "two" / "pyprune_report.json") as f:
        settings = json.load(f)["settings"]
    assert settings["world_size"] == 2 and settings["hessian_budget"] == int(0.000001 * 2**30)
