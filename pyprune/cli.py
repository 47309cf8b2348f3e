"""The ``pyprune`` command: argument parsing and printing only; the work is done by the library API.

    pyprune prune MODEL --method joint --sparsity 2:4 --calib-text FILE --nsamples 128 --seqlen 2048 \\
                        --block-size 128 --device cpu --output DIR
    torchrun --nproc-per-node 8 -m pyprune prune MODEL ... --output DIR      (distributed: see pyprune.distributed)
    pyprune inspect MODEL                                                     (what would be pruned)
    pyprune eval MODEL --text FILE --seqlen 2048 --nsamples N [--json]
    pyprune demo

MODEL is a Hugging Face model directory, a GGUF file, or ``builtin`` (SmolLM2-135M-Instruct). Exit status: 0 on
success, 2 for bad input (missing files, unsupported architecture, text too short, invalid settings), 1 for other
failures, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _BadInput(Exception):
    pass


def _sparsity(text: str):
    from .config import Sparsity
    try:
        return Sparsity.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _budget(text: str):
    """'auto', 'none' or a number of GiB -> what prune_model's hessian_budget takes."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB, 'auto' or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}")
    return int(value * 2**30)


def _blocks(text: str) -> list[int]:
    """'0,1,5' or '0-3' or a mix."""
    out = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like '0,1' or '0-3', got {text!r}") from None
    return out


def _add_device(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the model in (auto: as stored; GGUF: float32)")
    _add_threads(p)


def _add_threads(p):
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after each option's help, except where the default is None: those options say
    in their help what None picks (it depends on other options, e.g. the method)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .config import MASK_SCOPES, MASKS, METHODS
    from .owl import OWL_LAMBDA, OWL_M, PROFILES
    parser = argparse.ArgumentParser(prog="pyprune", description="One-shot LLM pruning with the joint multi-weight "
                                     "OBS update (Zhao et al., 2024), SparseGPT, Wanda or magnitude.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,inspect,eval,demo}")
    fmt = _DefaultsFormatter

    p = sub.add_parser("prune", help="prune a model and write a Hugging Face directory", formatter_class=fmt,
                       description="Prune MODEL block by block and write the pruned model to --output.")
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, or 'builtin'")
    p.add_argument("--method", default="joint", choices=METHODS)
    p.add_argument("--sparsity", default="0.5", type=_sparsity, help="fraction (0.5) or N:M (2:4, 4:8)")
    _add_calib_text(p)
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per calibration window")
    p.add_argument("--block-size", type=_positive_int, default=128, help="columns per joint solve block")
    p.add_argument("--damp", type=float, default=0.01, help="relative damping of the Hessian diagonal")
    p.add_argument("--shrink", type=float, default=None,
                   help="joint/sparsegpt: the fraction of the Hessian's off-diagonal removed before the solve, 0 to 1 "
                   "(default for joint: 0.5 up to 60%% sparsity, 0.25 from 70%%, linear between; 0 for sparsegpt). "
                   "The correlations between inputs are what differs most between kinds of text, so trusting them "
                   "less keeps the update from over-fitting the calibration text: on the built-in model (2:4, 50%%, "
                   "60%% and 70%%, 3 seeds, calibrated on prose or on code) joint with its default was below "
                   "SparseGPT and Wanda on every text of another kind but one tie, and at 70%% on the calibration "
                   "kind too (benchmarks/results/heldout_domains.md). Up to 60%%, 0.25 fits the calibration kind "
                   "closer and text of other kinds worse (take it when you calibrate on the text the model will "
                   "read); 0 is the paper's method, 1 Wanda's mask with no update")
    p.add_argument("--mask", default=None, choices=MASKS, help="mask selection (default: exact for N:M, "
                   "sparsegpt for unstructured)")
    p.add_argument("--mask-scope", default=None, choices=MASK_SCOPES,
                   help="unstructured masks: the fraction per row or per rows x B block (default: row for joint, "
                   "block for sparsegpt)")
    p.add_argument("--swaps", type=int, default=None,
                   help="joint only: at most this many pruned/kept exchanges per row of a block, each lowering the "
                   "row's exact block loss (default: 16; 0 keeps the mask as chosen). Their cost is on the summary's "
                   "'exchanges' line: on the CPU a layer's joint prune with 16 exchanges takes 0.8-1.1x its time "
                   "without them (benchmarks/results/bench_refine_solve.md)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "cuda", "triton"])
    p.add_argument("--sparsity-profile", default=None, choices=PROFILES,
                   help="owl: each block its own unstructured sparsity by its outliers (OWL, Yin et al. 2024): a "
                   "pre-pass over the dense blocks measures the fraction of Wanda scores |W_ij| ||X_j|| above "
                   "--owl-m times the block's mean; blocks with more are pruned less, the sparsities span 2 x "
                   "--owl-lambda (most to fewest outliers), their mean weighted by the blocks' weights equal to "
                   "--sparsity; the report lists each block's target (default: none, every block at --sparsity; "
                   "not with N:M). Recommended at 70%% and above: there it lowered the joint method's perplexity on "
                   "every held-out text by 9-28%% (3 seeds), for 30-60%% more prune time (README, issue 22)")
    p.add_argument("--owl-m", type=float, default=None, metavar="M",
                   help=f"--sparsity-profile owl: a score is an outlier above M times its block's mean (default "
                   f"{OWL_M:g})")
    p.add_argument("--owl-lambda", type=float, default=None, metavar="LAMBDA",
                   help=f"--sparsity-profile owl: the range of the blocks' sparsities around --sparsity; "
                   f"--sparsity +- LAMBDA must stay in [0, 1) (default {OWL_LAMBDA:g})")
    p.add_argument("--modules", nargs="+", default=None, metavar="PATTERN",
                   help="prune only these modules (fnmatch on names relative to a block, e.g. 'mlp.*')")
    p.add_argument("--dense", nargs="+", default=None, metavar="NAME",
                   help="also prune these normally dense parts by magnitude (e.g. mixer.conv1d for Mamba)")
    p.add_argument("--blocks", type=_blocks, default=None, help="prune only these blocks, e.g. '0-3'")
    p.add_argument("--true-sequential", action="store_true",
                   help="collect each group's Hessian after the earlier groups of its block are pruned")
    p.add_argument("--calibrate-all-experts", action="store_true",
                   help="MoE: each expert's Hessian from every calibration token (outputs stay routed)")
    p.add_argument("--hessian-budget", type=_budget, default="auto", metavar="GIB",
                   help="GiB of Hessians one block may hold at once (auto: half the free GPU memory; none: no "
                        "limit); groups beyond it are collected in further passes, after the earlier are pruned")
    p.add_argument("--expert-min-tokens", type=_positive_int, default=None, metavar="N",
                   help="MoE: experts with fewer routed tokens get Wanda's mask and no update (default: the "
                        "expert matrix's input width)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="calibration windows per forward pass (default: as many as make at most 2048 tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window positions")
    _add_device(p)
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty directory")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="stream a safetensors checkpoint block by block from disk (auto: when the weights exceed "
                        "half of the available memory, or when the causal LM is only part of the checkpoint, as in "
                        "a multimodal Llama 4 or Qwen 3.5: streaming writes the whole checkpoint back, the vision "
                        "tower as it was; off writes the text model alone)")
    p.add_argument("--no-resume", action="store_true", help="streaming: refuse to continue a partial run")
    p.add_argument("--distributed", action="store_true",
                   help="prune on the ranks of a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; "
                        "implied when WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs; rank 0 writes the output")
    p.add_argument("--dist-timeout", type=_positive_int, default=1800, metavar="SECONDS",
                   help="distributed: how long a rank waits for the others in a collective before failing")
    p.add_argument("--per-layer", action="store_true", help="print one row per pruned module")
    p.add_argument("--json", action="store_true", help="print the report summary as JSON on the last line")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="show what would be pruned (no calibration)", formatter_class=fmt,
                       description="List MODEL's decoder blocks, every prunable matrix with its shape (out x in), "
                                   "the matrices that share a Hessian (in brackets) and what stays dense, built "
                                   "from its config without reading a weight. Runs of identical blocks are folded.")
    i.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, or 'builtin'")
    i.add_argument("--all", action="store_true", help="one entry per block (no folding)")
    i.add_argument("--device", default="cpu", help="where the blocks run for the observation")
    i.add_argument("--json", action="store_true", help="also print the result as JSON on the last line")

    e = sub.add_parser("eval", help="perplexity of a model on a text", formatter_class=fmt,
                       description="Perplexity on consecutive non-overlapping windows of --text.")
    e.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, or 'builtin'")
    e.add_argument("--text", default="wikitext2", help="evaluation text file ('wikitext2' = shared test split)")
    e.add_argument("--seqlen", type=_positive_int, default=2048)
    e.add_argument("--nsamples", type=_positive_int, default=None, help="windows (default: all full windows)")
    e.add_argument("--batch-size", type=_positive_int, default=1)
    e.add_argument("--sequential", action="store_true",
                   help="run one decoder block at a time on the device (models larger than its memory)")
    _add_device(e)
    e.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="prune the built-in model and compare perplexities", formatter_class=fmt,
                       description="Prune SmolLM2-135M (built in) and print dense vs pruned perplexity, sparsity and "
                                   "wall times.")
    d.add_argument("--method", default="joint", choices=METHODS)
    d.add_argument("--sparsity", default="0.5", type=_sparsity)
    _add_calib_text(d)
    d.add_argument("--nsamples", type=_positive_int, default=32, help="calibration windows")
    d.add_argument("--seqlen", type=_positive_int, default=512)
    d.add_argument("--eval-nsamples", type=_positive_int, default=20, help="evaluation windows (wikitext2 test)")
    d.add_argument("--block-size", type=_positive_int, default=128)
    d.add_argument("--seed", type=int, default=0, help="seed of the calibration window positions")
    d.add_argument("--device", default="auto")
    _add_threads(d)
    d.add_argument("--output", "-o", default=None, metavar="DIR", help="also save the pruned model here")
    d.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


# Calibration default: half WikiText-2 validation, half a novel (A Tale of Two Cities). On SmolLM2-135M at 50%,
# 16 x 512 tokens, 40 x 512-token windows per text (benchmarks/results/heldout.md, seed 0): calibrated on WikiText-2
# alone, joint beat Wanda on WikiText-2 test (51.9 vs 62.6) but lost on two other novels (63.1 vs 56.3, 88.6 vs 81.0);
# calibrated on the mix, joint beat Wanda and SparseGPT on all three (54.8 / 46.2 / 69.1 against Wanda's 63.3 / 53.8
# / 78.1 and SparseGPT's 56.9 / 49.3 / 73.2), at a 5% cost on WikiText-2 itself.
DEFAULT_CALIB_TEXT = "wikitext2,gutenberg"


def _add_calib_text(p) -> None:
    p.add_argument("--calib-text", default=DEFAULT_CALIB_TEXT,
                   help="calibration text: a file, 'wikitext2' (the shared WikiText-2 validation split), 'gutenberg' "
                   "(a shared public-domain novel), 'self' (text the dense model generates itself: top-50 sampling "
                   "from its BOS token, seeded by --seed; not with streaming or distributed runs), or several of "
                   "these comma-separated (e.g. self,FILE), the samples split evenly between them")


def _calibration_samples(args, texts, tokenizer, source=None, model=None):
    """(calibration windows, seconds spent generating text): ``calibration_windows`` of ``texts``, where a None entry
    (``self`` in --calib-text) takes samples the dense model generates (pyprune.selfcalib; the model is loaded here
    for that alone unless given). What was generated is kept as ``args.self_generated`` ({"samples", "seconds"}, or
    None without ``self``) for the summary."""
    from .data import calibration_windows
    args.self_generated = None
    if None not in texts:
        return calibration_windows(tokenizer, texts, args.nsamples, args.seqlen, seed=args.seed), 0.0
    from .models.driver import resolve_device
    from .selfcalib import self_generated_samples
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    if model is None:
        from .models.io import load_model
        model = load_model(source, dtype=_dtype(args.dtype), device=device)
    counts = []

    def generate(count, seed):
        counts.append(count)
        return self_generated_samples(model, tokenizer, count, args.seqlen, seed=seed, device=device,
                                      progress=not args.quiet)
    samples = calibration_windows(tokenizer, texts, args.nsamples, args.seqlen, seed=args.seed, generate=generate)
    args.self_generated = {"samples": sum(counts), "seconds": time.perf_counter() - t0}
    return samples, args.self_generated["seconds"]


def _self_generated_line(args) -> str:
    g = args.self_generated
    return (f"self-generated calibration: {g['samples']} x {args.seqlen} tokens sampled from the dense model in "
            f"{g['seconds']:.1f} s (seeded by --seed)")


def _quiet_transformers():
    """The CLI owns the terminal: transformers' own warnings and loading bars would drown pyprune's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # (pyprune's own library calls silence them too: io.quiet_transformers)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _dtype(name: str):
    return None if name == "auto" else name


def _prune_config(args):
    from .config import PruneConfig
    return PruneConfig(method=args.method, sparsity=args.sparsity, block_size=args.block_size,
                       damp=getattr(args, "damp", 0.01), mask=getattr(args, "mask", None),
                       mask_scope=getattr(args, "mask_scope", None), backend=getattr(args, "backend", "auto"),
                       swaps=getattr(args, "swaps", None), shrink=getattr(args, "shrink", None))


def _note_compiled_ops(config) -> None:
    """Before any slow work: say so when the compiled ops are missing (backend auto then runs the torch references,
    much slower), once here instead of the library's warning later."""
    import warnings

    from .ops._backend import no_native_message
    msg = no_native_message() if config.backend == "auto" else None
    if msg:
        print(f"pyprune: note: {msg}", file=sys.stderr)
        warnings.filterwarnings("ignore", message="pyprune's compiled ops", category=RuntimeWarning)


def cmd_prune(args) -> int:
    from .data import calibration_texts
    from .models.driver import resolve_device
    from .models.io import check_nm_shapes, check_seqlen, check_supported, check_weights, load_tokenizer, resolve_model
    from .models.outdir import OutputDir
    from .models.pipeline import should_stream
    from .owl import make_profile
    config = _prune_config(args)
    make_profile(args.sparsity_profile, config.sparsity, args.owl_m, args.owl_lambda)  # before any slow work
    _note_compiled_ops(config)
    source = resolve_model(args.model)
    resolve_device(args.device)  # before any slow work: --device cuda on a machine without CUDA
    out = os.path.abspath(args.output)
    od = OutputDir(out, input_path=str(source))  # the output-versus-input check of the whole run, here only
    cfg = check_supported(source)  # the config or GGUF metadata only: no weight is loaded yet
    check_seqlen(cfg, args.seqlen)
    check_weights(source)  # every safetensors shard whole (a header read each)
    if config.backend != "auto":  # an unavailable backend fails now, not after loading
        from .ops._backend import resolve
        resolve(config.backend, "masked_solve", resolve_device(args.device))
    if config.sparsity.structured:
        check_nm_shapes(source, cfg, config.sparsity.m, args.modules)
    distributed = args.distributed or _env_world_size() > 1
    # distributed: every rank of this node holds the model unless it streams
    stream = should_stream(source, args.stream, copies=_local_world_size() if distributed else 1)
    od.check(args.overwrite, resume=stream and not args.no_resume)  # what the directory holds: writes nothing
    texts = calibration_texts(args.calib_text)  # a missing text fails before the model loads
    if None in texts and (stream or distributed):
        raise _BadInput(f"--calib-text {args.calib_text}: self-generated calibration text needs the whole model in "
                        "one process before pruning; it is not available "
                        + ("when streaming (give --stream off if the model fits in memory)" if stream else
                           "in a distributed run") + ", so give calibration text files")
    _quiet_transformers()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source)
    samples, t_gen = _calibration_samples(args, texts, tokenizer, source)
    t_tok = time.perf_counter() - t0 - t_gen
    if not distributed:
        return _prune_and_write(args, source, tokenizer, samples, config, od, t_tok, stream)
    from .distributed import init_from_env
    comm = init_from_env(device=args.device, timeout_s=args.dist_timeout)
    try:
        if args.nsamples < comm.world_size:
            raise _BadInput(f"--nsamples {args.nsamples} is smaller than the {comm.world_size} ranks")
        rc = _prune_and_write(args, source, tokenizer, samples, config, od, t_tok, stream, comm)
        comm.barrier()  # every rank leaves together, after rank 0 has written: none tears the group down early
        return rc
    finally:
        comm.close()


def _prune_and_write(args, source, tokenizer, samples, config, od, t_tok, stream, comm=None) -> int:
    """``prune_pretrained``, in memory or streamed, into the checked output directory ``od``; the run writes the
    report, whole. Distributed (``comm``): every rank prunes with its calibration shard and the same weights; rank 0
    alone writes the output and prints the summary."""
    from .models.pipeline import prune_pretrained
    out = os.path.abspath(od.given)
    main = comm is None or comm.is_main
    if comm is not None:
        from .distributed import shard_samples
        samples = shard_samples(samples, comm)
    if stream and main:
        from .models.streaming import partial_run
        done = partial_run(out)
        from .models.fp8 import weight_format
        from .models.io import model_config
        fp8 = weight_format(model_config(source), str(source)) if source.kind == "hf" else None
        _log(f"streaming {source} block by block into {out}"
             + (f" on {comm.world_size} ranks" if comm is not None else "")
             + (f"; its weights are {fp8.describe()}: each block dequantized to prune and written back in FP8 with "
                "new scales" if fp8 is not None else "")
             + (f"; resuming the unfinished run there after block {done}" if done is not None and
                not args.no_resume else ""))
    generated = getattr(args, "self_generated", None)
    report = prune_pretrained(str(source) if source.kind != "builtin" else "builtin", od, samples, config,
                              stream="on" if stream else "off", tokenizer=tokenizer, dtype=_dtype(args.dtype),
                              overwrite=args.overwrite, resume=not args.no_resume, modules=args.modules,
                              dense=args.dense, blocks=args.blocks,
                              device=args.device if comm is None else comm.device, batch_size=args.batch_size,
                              true_sequential=args.true_sequential,
                              calibrate_all_experts=args.calibrate_all_experts,
                              expert_min_tokens=args.expert_min_tokens, hessian_budget=args.hessian_budget,
                              progress=not args.quiet and main, comm=comm,
                              sparsity_profile=args.sparsity_profile, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                              labels={"calib_text": args.calib_text, "seed": args.seed},
                              times={"tokenize": t_tok,
                                     **({"self_generate": generated["seconds"]} if generated else {})})
    if not main:
        return EXIT_OK
    _print_prune_summary(args, report, out)
    removed = report.settings.get("replaced_files") or []
    if removed:
        _log(f"replaced the earlier pyprune output in {out}: removed {', '.join(removed[:10])}"
             + (f" and {len(removed) - 10} more" if len(removed) > 10 else ""))
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .models.pipeline import inspect_model
    _quiet_transformers()
    result = inspect_model(args.model, device=args.device)
    print(result.table(full=args.all))
    if args.json:
        print(json.dumps(result.to_dict()))
    return EXIT_OK


def _env_world_size() -> int:
    from .distributed import env_world_size
    return env_world_size()


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _print_prune_summary(args, report, out) -> None:
    print(report.table(per="layer" if args.per_layer else "block"))
    if getattr(args, "self_generated", None):
        print(_self_generated_line(args))
    print(f"pruned model written to {out} (report: {os.path.join(out, 'pyprune_report.json')})")
    if args.json:
        print(json.dumps({"output": out, "sparsity": report.sparsity, "pruned_sparsity": report.pruned_sparsity,
                          "kept_dense": len(report.dense), "total_loss": report.total_loss,
                          "layers": len(report.layers), "times": report.times,
                          "peak_host_rss": report.peak_host_rss, "peak_device_memory": report.peak_device_memory}))


def cmd_eval(args) -> int:
    from .data import eval_windows, load_text, tokenize
    from .evaluate import perplexity
    from .models.driver import resolve_device
    from .models.io import check_seqlen, check_supported, check_weights, load_model, load_tokenizer, resolve_model
    source = resolve_model(args.model)
    device = resolve_device(args.device)
    check_seqlen(check_supported(source), args.seqlen)
    check_weights(source)
    text = load_text(args.text, split="eval")
    _quiet_transformers()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source)
    windows = eval_windows(tokenize(tokenizer, text), args.seqlen, args.nsamples)
    model = load_model(source, dtype=_dtype(args.dtype))
    t_load = time.perf_counter() - t0
    result = perplexity(model, windows, device=device, batch_size=args.batch_size, progress=not args.quiet,
                        sequential=args.sequential)
    if not math.isfinite(result["perplexity"]):
        from .models.driver import nonfinite_params
        bad = nonfinite_params(model)
        raise _BadInput(f"the perplexity of {source} is not finite (mean NLL {result['nll']})"
                        + (f": non-finite weights in {', '.join(bad[:5])}" if bad else ""))
    print(f"perplexity {result['perplexity']:.4f}  ({result['windows']} x {result['seqlen']} tokens of "
          f"{args.text}; load {t_load:.1f} s, eval {result['seconds']:.1f} s)")
    if args.json:
        print(json.dumps({"model": str(source), "text": args.text, **result, "load_seconds": t_load}))
    return EXIT_OK


def cmd_demo(args) -> int:
    from .data import calibration_texts, eval_windows, load_text, shared_file, tokenize
    from .evaluate import perplexity
    from .models.driver import prune_model, resolve_device
    from .models.io import load_model, load_tokenizer, resolve_model, save_model
    config = _prune_config(args)
    _note_compiled_ops(config)
    texts = calibration_texts(args.calib_text)
    eval_path = shared_file("data", "wikitext2", "test.txt")
    device = resolve_device(args.device)
    progress = not args.quiet
    _quiet_transformers()
    t0 = time.perf_counter()
    source = resolve_model("builtin")
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples, t_gen = _calibration_samples(args, texts, tokenizer, model=model)
    windows = eval_windows(tokenize(tokenizer, load_text(eval_path)), args.seqlen, args.eval_nsamples)
    t_tok = time.perf_counter() - t0 - t_gen
    dense = perplexity(model, windows, device=device, progress=progress)
    report = prune_model(model, samples, config, device=device, progress=progress)
    pruned = perplexity(model, windows, device=device, progress=progress)
    if args.output:
        save_model(model, args.output, tokenizer=tokenizer, report=report, overwrite=True)
    sp = str(config.sparsity) if config.sparsity.structured else f"{config.sparsity.fraction:.0%}"
    rows = [
        ("model", f"SmolLM2-135M-Instruct (built-in GGUF), {len(report.layers)} linear layers"),
        ("method", f"{config.method}, sparsity {sp}, block size {config.block_size}"
                   + (f", Hessian shrink {config.shrink:g}" if config.shrink else "")
                   + (f", up to {config.swaps} exchanges per row of a block" if config.swaps else "")
                   + f", device {device}"),
        ("calibration", f"{args.nsamples} x {args.seqlen} tokens of {args.calib_text}"
                        + (f"; {_self_generated_line(args)}" if args.self_generated else "")),
        ("evaluation", f"{windows.shape[0]} x {windows.shape[1]} tokens of wikitext2/test.txt"),
        ("dense perplexity", f"{dense['perplexity']:.3f}"),
        ("pruned perplexity", f"{pruned['perplexity']:.3f}"),
        ("achieved sparsity", f"{report.sparsity:.4f} (of the pruned linear layers)"),
        ("wall time", f"load {t_load:.1f} s, tokenize {t_tok:.1f} s, calibrate+prune {report.times['total']:.1f} s, "
                      f"eval {dense['seconds']:.1f} + {pruned['seconds']:.1f} s"),
        *([("exchanges", f"{sum(r.exchanges for r in report.layers):,} made in "
                         f"{sum(r.exchange_seconds for r in report.layers):.1f} s of the prune (--swaps 0 skips "
                         "them)")] if config.swaps else []),
        ("peak memory", f"host RSS {report.peak_host_rss / 2**20:.0f} MiB" + (
            f", device {report.peak_device_memory / 2**20:.0f} MiB" if report.peak_device_memory else "")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        print(json.dumps({"dense_perplexity": dense["perplexity"], "pruned_perplexity": pruned["perplexity"],
                          "sparsity": report.sparsity, "method": config.method, "target": str(config.sparsity),
                          "load_seconds": t_load, "prune_seconds": report.times["total"],
                          "eval_seconds": [dense["seconds"], pruned["seconds"]],
                          "peak_host_rss": report.peak_host_rss}))
    return EXIT_OK


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


COMMANDS = {"prune": cmd_prune, "inspect": cmd_inspect, "eval": cmd_eval, "demo": cmd_demo}


def _message(e: BaseException) -> str:
    """The error and the notes pyprune added to it (e.g. which blocks were already pruned)."""
    return "; ".join([str(e), *getattr(e, "__notes__", [])])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _log("pyprune: interrupted")
        return EXIT_INTERRUPTED
    except (_BadInput, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        if os.environ.get("PYPRUNE_DEBUG"):
            raise
        _log(f"pyprune {args.command}: error: {_message(e)}")
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - a CLI reports, it does not dump a traceback unless asked
        if os.environ.get("PYPRUNE_DEBUG"):
            raise
        _log(f"pyprune {args.command}: failed: {type(e).__name__}: {_message(e)} (set PYPRUNE_DEBUG=1 for a "
             "traceback)")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
