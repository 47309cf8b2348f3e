"""Calibration and evaluation text -> token batches.

Text comes from local files; the names ``wikitext2`` (WikiText-2), ``gutenberg`` (public-domain books) and ``c4``
(through the optional ``datasets`` package, from its local cache only) are accepted as shortcuts. The first two are
read from the shared data folder (``shared_dir``: ``$PYPRUNE_SHARED``, else ``../shared`` beside a source checkout,
else the byte-identical copies that ship inside the package), so an installed wheel needs no folder of its own.
Nothing here needs a network. Calibration may mix several texts (``mixed_calibration_samples``):
on SmolLM2-135M, half WikiText-2 and half a novel made the joint update win on novels it never saw, where WikiText-2
alone made it lose to Wanda (benchmarks/results/heldout.md).

Text files are decoded strictly: UTF-8 unless an encoding is given; a file with a NUL byte (binary, or UTF-16/32
text) or with bytes invalid in the encoding is refused with an error naming the file, the byte offset and the fix.
No byte is ever replaced silently. A UTF-8 byte-order mark is kept (as U+FEFF), as before.
"""
from __future__ import annotations

import codecs
import os

import torch


class TextTooShortError(ValueError):
    """The text has fewer tokens than the requested samples need."""


class NotTextError(ValueError):
    """A text file that is binary or not valid in its encoding."""


def repo_root() -> str:
    """The parent of the ``pyprune`` package directory: the project root in a source checkout (or an editable
    install), ``site-packages`` in an installed wheel."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def packaged_dir() -> str:
    """The copies of the shared texts that ship inside the package (``pyprune/shared``: the WikiText-2 validation and
    test splits and the two books the defaults read, byte-identical to the project's shared folder, with their
    licences in its README.md)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shared")


def checkout_shared_dir() -> str | None:
    """``../shared`` beside a source checkout (a project root that holds setup.py), or None where there is none (an
    installed wheel, or a checkout without the folder beside it)."""
    root = repo_root()
    path = os.path.join(os.path.dirname(root), "shared")
    return path if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(path) else None


def shared_dir() -> str:
    """The folder the named texts are read from (it holds ``data/wikitext2/...`` and ``data/gutenberg/...``), the
    first of: ``$PYPRUNE_SHARED`` if set (an error if it does not exist); ``../shared`` beside a source checkout (the
    project's full shared folder, so benchmarks read the same files as before); the copies packaged with pyprune
    (``packaged_dir``), which hold only what the defaults read. The packaged files equal the shared ones byte for
    byte, so a named text gives the same token ids wherever it is read from."""
    env = os.environ.get("PYPRUNE_SHARED")
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError(f"PYPRUNE_SHARED points to {env!r}, which does not exist; set PYPRUNE_SHARED to "
                                    "the folder that holds data/wikitext2/{valid,test}.txt, or unset it to use the "
                                    "texts packaged with pyprune")
        return env
    path = checkout_shared_dir() or packaged_dir()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"the texts packaged with pyprune are missing ({path!r} does not exist: a broken "
                                "install?); reinstall pyprune, or set PYPRUNE_SHARED to the folder that holds "
                                "data/wikitext2/{valid,test}.txt")
    return path


def shared_file(*parts: str) -> str:
    """The path of ``os.path.join(*parts)`` inside ``shared_dir()`` (e.g. ``shared_file("data", "wikitext2",
    "test.txt")``); FileNotFoundError naming the file, and for the packaged copies, what they hold."""
    root = shared_dir()
    path = os.path.join(root, *parts)
    if os.path.isfile(path):
        return path
    if os.path.abspath(root) == os.path.abspath(packaged_dir()):
        held = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                      for d, _, files in os.walk(root) for f in files if f.endswith(".txt"))
        raise FileNotFoundError(f"{'/'.join(parts)!r} is not among the texts packaged with pyprune ({', '.join(held)}"
                                "); set PYPRUNE_SHARED to a folder that holds it")
    raise FileNotFoundError(f"shared data file {path!r} is missing")


# The shared books (data/gutenberg/): one to calibrate on, and one other to evaluate on, never the same.
_GUTENBERG_SPLITS = {"calib": "98-0.txt", "eval": "pg1342.txt"}  # A Tale of Two Cities / Pride and Prejudice
_WIKITEXT_SPLITS = {"train": "valid.txt", "calib": "valid.txt", "validation": "valid.txt", "valid": "valid.txt",
                    "eval": "test.txt", "test": "test.txt"}


def read_text_file(path: str, encoding: str = "utf-8") -> str:
    """The text of file ``path``, decoded strictly with ``encoding``, line ends made "\\n". NotTextError (a
    ValueError) for a file with a NUL byte (binary, or UTF-16/32 text) or with bytes that are invalid in
    ``encoding``; it names the file, the offset of the first bad byte, and how to fix it."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (for {path!r}); give e.g. 'utf-8' or 'latin-1'") from None
    with open(path, "rb") as f:
        data = f.read()
    nul = data.find(b"\0")
    if nul >= 0:
        raise NotTextError(f"{path!r} is not a text file: it has a NUL byte at offset {nul} (a binary file, or "
                           "UTF-16/32 text: convert that to UTF-8); give a text file")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise NotTextError(f"{path!r} is not valid {encoding} text: byte 0x{data[e.start]:02x} at offset {e.start} "
                           f"({e.reason}); convert the file to UTF-8 (for Latin-1 text: iconv -f latin1 -t utf-8), "
                           "or give its encoding (load_text(..., encoding='latin-1'))") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open()


def strip_gutenberg_header(text: str) -> str:
    """A Project Gutenberg book's text from the line after its '*** START OF' marker (the whole text without one)."""
    at = text.find("*** START OF")
    return text if at < 0 else text[text.find("\n", at) + 1:]


def load_text(source: str, split: str = "eval", *, encoding: str = "utf-8") -> str:
    """The text of a local file (decoded strictly with ``encoding``: see ``read_text_file``), or of a named data
    set read from ``shared_dir()``: ``wikitext2`` (valid.txt to calibrate, test.txt to evaluate; ``wikitext2-raw``
    is the raw test split, in the full shared folder only), ``gutenberg`` (the books without their licence header: A
    Tale of Two Cities to calibrate, Pride and Prejudice to evaluate), or ``c4`` (``datasets``, local cache only).
    ``split`` is "calib" or "eval"."""
    if os.path.isfile(source):
        text = read_text_file(source, encoding)
        if not text.strip():
            raise TextTooShortError(f"text file {source!r} is empty")
        return text
    if os.path.isdir(source):
        raise FileNotFoundError(f"{source!r} is a directory, expected a text file")
    name = source.lower()
    if name in ("wikitext2", "wikitext-2", "wikitext2-raw"):
        if name == "wikitext2-raw":
            return load_text(shared_file("data", "wikitext2", "test.raw.txt"))
        return load_text(shared_file("data", "wikitext2", _WIKITEXT_SPLITS.get(split, "test.txt")))
    if name == "gutenberg":
        book = _GUTENBERG_SPLITS["calib" if split == "calib" else "eval"]
        return strip_gutenberg_header(load_text(shared_file("data", "gutenberg", book)))
    if name == "c4":
        return _load_c4(split)
    raise FileNotFoundError(f"text file {source!r} not found (give a path to a text file, or 'wikitext2' / "
                            "'gutenberg' / 'c4')")


def _load_c4(split: str) -> str:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise FileNotFoundError("'c4' needs the optional 'datasets' package (not installed); give a local text "
                                "file instead") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset
    files = ({"train": "en/c4-train.00000-of-01024.json.gz"} if split == "calib" else
             {"validation": "en/c4-validation.00000-of-00008.json.gz"})
    try:
        ds = load_dataset("allenai/c4", data_files=files, split=next(iter(files)))
    except Exception as e:  # noqa: BLE001 - any failure means "not in the local cache"
        raise FileNotFoundError(f"'c4' is not available offline ({type(e).__name__}); give a local text file") from e
    return "\n\n".join(ds[i]["text"] for i in range(min(len(ds), 5000)))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random start positions (a seeded generator, so the same text and
    seed give the same samples), as a (nsamples, seqlen) LongTensor."""
    _check_counts(nsamples, seqlen)
    n = int(tokens.numel())
    if n < seqlen:
        raise TextTooShortError(f"calibration text has {n} tokens, fewer than one sample of seqlen={seqlen}")
    starts_available = n - seqlen + 1
    if nsamples > starts_available:
        raise TextTooShortError(f"calibration text has {n} tokens: only {starts_available} distinct windows of "
                                f"{seqlen} tokens, fewer than nsamples={nsamples}")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, starts_available, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def mixed_calibration_samples(streams: list[torch.Tensor], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows drawn as evenly as possible from several token streams (the first ``nsamples % k`` streams
    give one more), each by ``calibration_samples`` with the same seed, stacked in stream order. One stream gives
    exactly ``calibration_samples``'s windows."""
    _check_counts(nsamples, seqlen)
    k = len(streams)
    if k == 0:
        raise ValueError("mixed calibration needs at least one token stream")
    if nsamples < k:
        raise ValueError(f"nsamples={nsamples} is fewer than the {k} calibration texts: every text needs a sample")
    counts = [nsamples // k + (i < nsamples % k) for i in range(k)]
    return torch.cat([calibration_samples(t, c, seqlen, seed=seed) for t, c in zip(streams, counts)])


# The calibration-spec entry for text the model generates itself (pyprune.selfcalib); a file of that name is given
# as ./self.
SELF_CALIB = "self"


def calibration_texts(spec: str) -> list[str | None]:
    """The texts of a calibration spec, read with ``split="calib"``: one file, or comma-separated files / named sets
    (``wikitext2,gutenberg``), where the entry ``self`` (at most once) stands for text the model generates itself and
    gives None. Fails on the first missing or unreadable text, naming it."""
    if spec.strip() != SELF_CALIB and os.path.isfile(spec):
        sources = [spec]
    else:
        sources = [s.strip() for s in spec.split(",") if s.strip()]
    if not sources:
        raise ValueError(f"no calibration text in {spec!r}")
    if sources.count(SELF_CALIB) > 1:
        raise ValueError(f"calibration spec {spec!r} names {SELF_CALIB!r} more than once")
    return [None if s == SELF_CALIB else load_text(s, split="calib") for s in sources]


def calibration_windows(tokenizer, texts: list[str | None], nsamples: int, seqlen: int, seed: int = 0,
                        generate=None) -> torch.Tensor:
    """Calibration windows from several texts: the samples split evenly between them (the first ``nsamples % k`` get
    one more), stacked in order; a text's windows are ``calibration_samples`` of its tokens with ``seed``, and a None
    entry (``self`` in the spec) takes ``generate(count, seed)``, a (count, seqlen) LongTensor of self-generated ids
    (``pyprune.selfcalib.self_generated_samples``). With texts only, exactly ``mixed_calibration_samples``."""
    _check_counts(nsamples, seqlen)
    if None not in texts:
        return mixed_calibration_samples([tokenize(tokenizer, t) for t in texts], nsamples, seqlen, seed=seed)
    if generate is None:
        raise ValueError("self-generated calibration text needs the model: no generate function given")
    k = len(texts)
    if nsamples < k:
        raise ValueError(f"nsamples={nsamples} is fewer than the {k} calibration texts: every text needs a sample")
    counts = [nsamples // k + (i < nsamples % k) for i in range(k)]
    parts = []
    for t, c in zip(texts, counts):
        if t is None:
            ids = generate(c, seed)
            if tuple(ids.shape) != (c, seqlen):
                raise ValueError(f"generate returned ids of shape {tuple(ids.shape)}, expected {(c, seqlen)}")
            parts.append(ids.to(torch.long).cpu())
        else:
            parts.append(calibration_samples(tokenize(tokenizer, t), c, seqlen, seed=seed))
    return torch.cat(parts)


def eval_windows(tokens: torch.Tensor, seqlen: int, nsamples: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens from the start of the text, (k, seqlen). With
    ``nsamples`` None, every full window; otherwise exactly ``nsamples`` of them (or an error)."""
    _check_counts(nsamples if nsamples is not None else 1, seqlen)
    n = int(tokens.numel())
    available = n // seqlen
    if nsamples is None:
        if available == 0:
            raise TextTooShortError(f"evaluation text has {n} tokens, fewer than one window of seqlen={seqlen}")
        nsamples = available
    elif nsamples > available:
        raise TextTooShortError(f"evaluation text has {n} tokens: {available} windows of {seqlen} tokens, fewer "
                                f"than nsamples={nsamples}")
    return tokens[: nsamples * seqlen].reshape(nsamples, seqlen)


def _check_counts(nsamples: int, seqlen: int) -> None:
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
