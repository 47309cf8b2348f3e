"""Streaming demo: prune a synthetic sharded Llama checkpoint several times larger than the memory the run may use.

1. Writes a synthetic safetensors checkpoint (one shard per block, written block by block).
2. Run A: prunes it in a child process under a hard address-space limit (RLIMIT_AS, so resident memory can never
   exceed it), measuring the child's peak RSS (wait4's ru_maxrss).
3. Run B: the same, SIGKILLed once a few blocks are durably done, then restarted: it resumes from the last finished
   block.
4. Checks that B's output equals A's bit for bit, that the input directory is unchanged (SHA-256 of every file), and
   that the output loads with transformers' from_pretrained and runs.

    .venv/bin/python benchmarks/streaming_demo.py                     # 3.4 GiB checkpoint, 1.4 GiB address-space limit
    .venv/bin/python benchmarks/streaming_demo.py --layers 8 --hidden 512   # quick

Results are printed and written to benchmarks/results/streaming_demo.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = """
import json, sys, time, torch
from pyprune import PruneConfig
from pyprune.models.streaming import prune_checkpoint
src, out, method, nsamples, seqlen, vocab = sys.argv[1:7]
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, int(vocab), (int(nsamples), int(seqlen)), generator=g)
t0 = time.perf_counter()
report = prune_checkpoint(src, out, ids, PruneConfig(method=method, sparsity="2:4"), batch_size=1)
vm_peak = int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "vm_peak": vm_peak, "sparsity": report.sparsity, "layers": len(report.layers),
                  "peak_rss_reported": report.peak_host_rss, "times": report.times}))
"""


def tree_hash(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def run_child(args, src, out, limit_bytes, kill_after=None):
    """Run the pruning child under RLIMIT_AS; optionally SIGKILL it once block ``kill_after`` is durably done.
    Returns (returncode, stdout, stderr, peak RSS of the child in bytes from wait4, seconds)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    cmd = [sys.executable, "-c", CHILD, src, out, args.method, str(args.nsamples), str(args.seqlen),
           str(args.vocab)]
    # Large allocations straight from mmap (returned to the OS on free): without this glibc's heap arenas keep
    # growing the address space block after block (the resident set stays flat either way).
    env = {**os.environ, "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    log_out, log_err = out + ".stdout", out + ".stderr"
    t0 = time.perf_counter()
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, preexec_fn=limit)
    state = os.path.join(out, ".pyprune-partial", "state.json")
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if kill_after is not None:
            try:
                with open(state) as f:
                    if json.load(f)["done"] >= kill_after:
                        os.kill(proc.pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    with open(log_out) as fo, open(log_err) as fe:
        return proc.returncode, fo.read(), fe.read(), usage.ru_maxrss * 1024, seconds


def compare_outputs(a: str, b: str) -> tuple[int, int]:
    import torch
    from pyprune.models.streaming import read_safetensors
    files = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
    assert files == sorted(f for f in os.listdir(b) if f.endswith(".safetensors")), "different shard sets"
    tensors = 0
    for f in files:
        ta, tb = read_safetensors(os.path.join(a, f)), read_safetensors(os.path.join(b, f))
        assert ta.keys() == tb.keys(), f
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
            tensors += 1
    return len(files), tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/pyprune_streaming_demo")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=None, help="default: = hidden")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--method", default="wanda", choices=["joint", "sparsegpt", "wanda", "magnitude"])
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--limit-mb", type=int, default=1400, help="RLIMIT_AS of the pruning process (MiB)")
    ap.add_argument("--kill-after", type=int, default=None, help="SIGKILL run B once this block is done "
                    "(default: a third of the layers)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--output-json", default=os.path.join(ROOT, "benchmarks", "results", "streaming_demo.json"))
    args = ap.parse_args()
    intermediate = args.intermediate or args.hidden
    kill_after = args.kill_after if args.kill_after is not None else max(1, args.layers // 3)
    from tests.models.tiny import write_synthetic_llama

    src = os.path.join(args.workdir, "src")
    out_a, out_b = os.path.join(args.workdir, "out_a"), os.path.join(args.workdir, "out_b")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    t0 = time.perf_counter()
    size = write_synthetic_llama(src, hidden=args.hidden, intermediate=intermediate, layers=args.layers,
                                 vocab=args.vocab, heads=max(1, args.hidden // 128), kv_heads=max(1, args.hidden // 256))
    t_write = time.perf_counter() - t0
    src_hash = tree_hash(src)
    limit = args.limit_mb << 20
    print(f"synthetic checkpoint: {size / 2**30:.2f} GiB in {args.layers} blocks "
          f"({size / args.layers / 2**20:.1f} MiB each), written in {t_write:.1f} s; process limit "
          f"RLIMIT_AS = {args.limit_mb} MiB", flush=True)

    rc, so, se, peak_a, sec_a = run_child(args, src, out_a, limit)
    if rc != 0:
        sys.exit(f"run A failed (rc {rc}):\n{se[-3000:]}")
    res_a = json.loads(so.strip().splitlines()[-1])
    print(f"run A: {sec_a:.1f} s, peak RSS {peak_a / 2**20:.0f} MiB (VmHWM {res_a['peak_rss_reported'] / 2**20:.0f} "
          f"MiB, address space peak {res_a['vm_peak'] / 2**20:.0f} MiB), sparsity {res_a['sparsity']:.4f}, "
          f"{res_a['layers']} layers", flush=True)

    rc_kill, _, se_kill, _, sec_kill = run_child(args, src, out_b, limit, kill_after=kill_after)
    state = json.load(open(os.path.join(out_b, ".pyprune-partial", "state.json")))
    print(f"run B: SIGKILLed after {sec_kill:.1f} s (rc {rc_kill}) with {state['done'] + 1} blocks done", flush=True)
    if rc_kill != -signal.SIGKILL:
        sys.exit(f"run B ended on its own before the kill (rc {rc_kill}):\n{se_kill[-3000:]}")
    rc, so, se, _, sec_b = run_child(args, src, out_b, limit)
    if rc != 0:
        sys.exit(f"resumed run B failed (rc {rc}):\n{se[-3000:]}")
    res_b = json.loads(so.strip().splitlines()[-1])
    print(f"run B resumed: {sec_b:.1f} s, VmHWM {res_b['peak_rss_reported'] / 2**20:.0f} MiB", flush=True)

    files, tensors = compare_outputs(out_a, out_b)
    print(f"A and B identical: {files} shards, {tensors} tensors compared bit for bit", flush=True)
    unchanged = tree_hash(src) == src_hash
    print(f"input unchanged (SHA-256 of every file): {unchanged}", flush=True)
    assert unchanged

    import torch
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out_a)
    with torch.no_grad():
        logits = model(torch.arange(16)[None] % args.vocab).logits
    zeros = float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean())
    print(f"output loads with from_pretrained ({time.perf_counter() - t0:.1f} s), logits finite: "
          f"{bool(torch.isfinite(logits).all())}, up_proj zeros {zeros:.3f}", flush=True)
    del model
    result = {"checkpoint_bytes": size, "layers": args.layers, "hidden": args.hidden, "intermediate": intermediate,
              "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen, "limit_bytes": limit,
              "run_a_seconds": sec_a, "run_a_peak_rss": peak_a, "run_a_vmhwm": res_a["peak_rss_reported"], "run_a_vm_peak": res_a["vm_peak"],
              "killed_after_blocks": state["done"] + 1, "resume_seconds": sec_b,
              "resume_vmhwm": res_b["peak_rss_reported"], "identical": True, "input_unchanged": unchanged,
              "ratio_checkpoint_to_peak_rss": size / peak_a}
    print(f"checkpoint / peak RSS = {size / peak_a:.1f}x", flush=True)
    os.makedirs(os.path.dirname(args.output_json), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
