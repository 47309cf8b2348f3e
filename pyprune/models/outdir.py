"""Where pyprune writes, and what it may remove there.

The rule: pyprune never deletes or replaces a file it did not write, and never writes where its input lives.

- ``check_output_vs_input``: the output is not the input, not inside an input directory, does not contain the input,
  and is not the directory that holds an input file (a .gguf); all paths resolved through symbolic links.
- Every finished output holds ``pyprune_manifest.json``, written last, listing the files pyprune wrote there. A
  directory without it is never taken for a finished pyprune output.
- While a run writes, ``pyprune_unfinished.json`` (the journal) lists the files it has claimed and the files of the
  earlier output it replaces, so a later run knows them as pyprune's own: it resumes them or removes them.
- Temporary names start with ``.pyprune-tmp-<pid>``; a later run removes those whose process is gone (on this host).

The library prints nothing: what was removed is returned (``OutputDir.finish``) and listed in the manifest.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

from ..report import TEMP_PREFIX, atomic_open as _atomic  # noqa: F401 - TEMP_PREFIX is part of this API

MANIFEST_NAME = "pyprune_manifest.json"
JOURNAL_NAME = "pyprune_unfinished.json"
_TEMP_RE = re.compile(r"^\.pyprune-tmp-(\d+)(?:-|$)")
# Files a model loader reads: a foreign one beside pyprune's output would mix with it, so it is refused up front.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".index.json")
MODEL_NAMES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                         "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                         "pyprune_report.json"})


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, root: str) -> bool:
    """``path`` is strictly below ``root`` (both resolved)."""
    return path != root and path.startswith(root.rstrip(os.sep) + os.sep)


def _check_against(out: str, inp: str, out_given, inp_given, input_is_dir: bool) -> None:
    if input_is_dir:
        what = ("is the input directory" if out == inp else "is inside the input directory" if _inside(out, inp)
                else "contains the input" if _inside(inp, out) else None)
    else:
        holder = os.path.dirname(inp)
        what = ("is the input file" if out == inp else "is the directory that holds the input file"
                if out == holder else "contains the input" if _inside(inp, out) else None)
    if what is not None:
        raise ValueError(f"output {os.fspath(out_given)!r} (resolved: {out}) {what} {os.fspath(inp_given)!r} "
                         f"(resolved: {inp}); pyprune never writes where its input lives: choose an output "
                         "directory outside it")


def check_output_vs_input(out, input_path) -> None:
    """Refuse (ValueError naming both paths) an output directory ``out`` that is the input directory, inside it, or
    contains the input, or that is the directory holding an input file (a .gguf; a directory beside or below that
    file is fine). Paths are resolved with ``os.path.realpath``, so symbolic links on either side do not hide it;
    an input that is itself a link is checked both where the link is and where it points."""
    given = os.path.abspath(os.fspath(input_path))
    resolved = _real(given)
    link = os.path.join(_real(os.path.dirname(given)), os.path.basename(given))
    for inp in dict.fromkeys((resolved, link)):
        _check_against(_real(out), inp, out, input_path, os.path.isdir(resolved))


def _alive(pid) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_pid(name: str) -> int | None:
    m = _TEMP_RE.match(name)
    return int(m.group(1)) if m else None


def _check_name(name) -> str:
    """A file name relative to the output directory, with '/' separators; refuses escapes and reserved names."""
    n = os.fspath(name).replace(os.sep, "/")
    parts = n.split("/")
    if not n or n.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"output file name {os.fspath(name)!r} must be a relative path inside the output directory")
    if n in (MANIFEST_NAME, JOURNAL_NAME) or any(_temp_pid(p) is not None for p in parts):
        raise ValueError(f"output file name {n!r} is reserved for pyprune's own bookkeeping")
    return n


def _is_model_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in MODEL_NAMES or base.endswith(MODEL_SUFFIXES)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: str, data: dict) -> None:
    with _atomic(path) as f:
        f.write((json.dumps(data, indent=1) + "\n").encode())


def output_state(path) -> str:
    """What directory ``path`` holds: ``"missing"``, ``"empty"`` (pyprune temporaries aside), ``"finished"`` (a
    manifest and no journal), ``"unfinished"`` (a journal: a run was killed, failed or is still writing), or
    ``"other"`` (files, no manifest, no journal: not a pyprune output). A loader should refuse ``"unfinished"``."""
    p = _real(path)
    if not os.path.lexists(p):
        return "missing"
    if not os.path.isdir(p):
        return "other"
    names = os.listdir(p)
    if JOURNAL_NAME in names:
        return "unfinished"
    if MANIFEST_NAME in names:
        return "finished"
    return "other" if any(_temp_pid(n) is None for n in names) else "empty"


class OutputDir:
    """One run's writes into an output directory, under the rule of the module docstring.

    Use: ``od = OutputDir(out, input_path=src)``; ``od.prepare(overwrite, resume=...)``; for each file,
    ``path = od.claim(name)`` *before* writing it (or ``with od.open(name) as f``, which claims and writes
    atomically); ``od.discard(name)`` for a claimed file the run removes again (state files); ``od.finish()`` at the
    end. Until ``finish`` the directory holds the journal, so a killed run is never taken for a finished output.

    What may be in ``out`` (checked by ``check``/``prepare``, which raise FileExistsError naming the files and fix):
    - nothing, or only pyprune temporaries: written freely;
    - an earlier finished pyprune output (manifest): replaced only with ``overwrite=True``; only the files its
      manifest lists are replaced or removed;
    - an unfinished run (journal): a resumable one (written with ``resume=True``) is continued with ``resume=True``,
      and needs ``overwrite=True`` to be replaced instead; a non-resumable one (an interrupted ``save_model``) is
      replaced without ``overwrite``, since nothing of it can be used;
    - files pyprune did not write: beside a manifest or journal they are kept untouched, unless they are model files
      (``MODEL_NAMES``, ``MODEL_SUFFIXES``) that a loader would mix with the new output: those are refused; in a
      directory without manifest or journal any file is refused, with or without ``overwrite`` (pyprune cannot tell
      its own files there; an output of a pyprune older than the manifest must be removed by hand).
    """

    def __init__(self, path, *, input_path=None):
        self.given = os.fspath(path)
        self.path = _real(path)
        self.input_path = None if input_path is None else os.fspath(input_path)  # checked against, once, here
        if input_path is not None:
            check_output_vs_input(path, input_path)
        self.replaced: list[str] = []   # earlier pyprune files this run replaces (set by prepare)
        self.removed: list[str] = []    # what this run removed, relative to ``path`` ('../' for siblings)
        self._written: dict[str, None] = {}
        self._resumable = False
        self._prepared = False
        self._finished = False

    # ------------------------------------------------------------------------------------------------- inspection
    @property
    def files(self) -> list[str]:
        """The names claimed by this run (and, when resuming, by the run it continues), in claim order."""
        return list(self._written)

    def _path(self, name: str) -> str:
        path = os.path.join(self.path, *name.split("/"))
        parent = _real(os.path.dirname(path))
        if parent != self.path and not _inside(parent, self.path):
            raise ValueError(f"{name!r} resolves to {parent!r}, outside the output directory {self.path!r} (a "
                             "symbolic link inside it); pyprune writes and removes only inside it")
        return path

    def _read(self, name: str) -> dict | None:
        path = os.path.join(self.path, name)
        if not os.path.lexists(path):
            return None
        try:
            with open(path) as f:
                data = json.load(f)
            lists = ("files",) if name == MANIFEST_NAME else ("replacing", "written")
            if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in lists):
                raise ValueError("unexpected content")
            for k in lists:
                data[k] = [_check_name(n) for n in data[k]]
        except (OSError, ValueError) as e:
            raise ValueError(f"{path!r} is not a valid pyprune {'manifest' if name == MANIFEST_NAME else 'journal'} "
                             f"({e}); pyprune cannot tell which files there are its own: choose another output "
                             "directory or clean this one by hand") from None
        return data

    def _walk(self) -> list[str]:
        """Every file (and symbolic link) under the directory, relative, except the manifest, the journal and
        pyprune temporaries."""
        out = []
        for root, dirs, files in os.walk(self.path):
            rel = os.path.relpath(root, self.path)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            keep = []
            for d in dirs:
                if _temp_pid(d) is not None:
                    continue
                if os.path.islink(os.path.join(root, d)):
                    out.append(prefix + d)
                else:
                    keep.append(d)
            dirs[:] = keep
            for f in files:
                if _temp_pid(f) is None and not (prefix == "" and f in (MANIFEST_NAME, JOURNAL_NAME)):
                    out.append(prefix + f)
        return sorted(out)

    def _leftovers(self) -> list[str]:
        """Temporaries of dead pyprune processes: ``.pyprune-tmp-<pid>*`` anywhere inside, and the sibling
        ``OUT.tmp-<pid>`` / ``OUT.old-<pid>`` directories older pyprune versions left (only when every file in them
        is a model file, the only thing those versions wrote there)."""
        found = []
        if os.path.isdir(self.path):
            for root, dirs, files in os.walk(self.path):
                rel = os.path.relpath(root, self.path)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                for name in list(dirs) + files:
                    pid = _temp_pid(name)
                    if pid is not None and pid != os.getpid() and not _alive(pid):
                        found.append(prefix + name + ("/" if name in dirs else ""))
                dirs[:] = [d for d in dirs if _temp_pid(d) is None]
        parent, base = os.path.split(self.path)
        legacy = re.compile(re.escape(base) + r"\.(?:tmp|old)-(\d+)$")
        try:
            siblings = os.listdir(parent)
        except OSError:
            siblings = []
        for name in sorted(siblings):
            m = legacy.match(name)
            sib = os.path.join(parent, name)
            if not m or os.path.islink(sib) or not os.path.isdir(sib) or _alive(int(m.group(1))):
                continue
            contents = [f for _, _, fs in os.walk(sib) for f in fs]
            if all(f in MODEL_NAMES or f.endswith(MODEL_SUFFIXES) for f in contents):
                found.append(f"../{name}/")
        return found

    def _plan(self, overwrite: bool, resume: bool) -> tuple[list[str], list[str]]:
        """(files to replace, files already written by the run being resumed); raises when refused."""
        p, given = self.path, self.given
        if not os.path.lexists(p):
            return [], []
        if not os.path.isdir(p):
            raise FileExistsError(f"output {given!r} exists and is not a directory; give a directory path")
        manifest = self._read(MANIFEST_NAME)
        journal = self._read(JOURNAL_NAME)
        if manifest is None and journal is None:
            foreign = sorted(n for n in os.listdir(p) if _temp_pid(n) is None)  # no need to walk a big tree
            if foreign:
                legacy = (" It looks like the output of a pyprune older than the manifest: remove it by hand."
                          if "pyprune_report.json" in foreign else "")
                raise FileExistsError(f"output directory {given!r} is not empty and holds files pyprune did not "
                                      f"write ({_some(foreign)}); pyprune never replaces or deletes those, with or "
                                      f"without overwrite: choose a new or empty directory.{legacy}")
            return [], []
        old = manifest["files"] if manifest else []
        known = set(old)
        if journal is not None:
            known |= set(journal["replacing"]) | set(journal["written"])
        foreign = [f for f in self._walk() if f not in known]
        if journal is not None:
            pid = journal.get("pid")
            if pid != os.getpid() and _alive(pid):
                raise FileExistsError(f"another pyprune process (pid {pid}) is writing {given!r} ({JOURNAL_NAME}); "
                                      "wait for it to finish or choose another output directory")
            resumable = bool(journal.get("resumable"))
            if resumable and resume:
                written = list(dict.fromkeys(journal["written"]))
                replacing = [n for n in dict.fromkeys(journal["replacing"] + old) if n not in set(written)]
            else:
                if resumable and not overwrite:
                    raise FileExistsError(f"output directory {given!r} holds an unfinished, resumable pyprune run "
                                          f"({JOURNAL_NAME}); resume it, pass overwrite=True (pyprune prune "
                                          "--overwrite) to replace it, or choose another directory")
                written = []
                replacing = list(dict.fromkeys(journal["replacing"] + journal["written"] + old))
        else:
            if not overwrite:
                raise FileExistsError(f"output directory {given!r} holds an earlier pyprune output ({len(old)} files "
                                      f"listed in {MANIFEST_NAME}); pass overwrite=True (pyprune prune --overwrite) "
                                      "to replace those files (others there are kept), or choose another directory")
            written, replacing = [], list(old)
        in_the_way = [f for f in foreign if _is_model_file(f)]
        if in_the_way:
            raise FileExistsError(f"output directory {given!r} holds model files pyprune did not write "
                                  f"({_some(in_the_way)}): they would mix with the new output and pyprune never "
                                  "deletes files it did not write; move them away or choose another directory")
        return replacing, written

    # ---------------------------------------------------------------------------------------------------- writing
    def check(self, overwrite: bool = False, *, resume: bool = False) -> list[str]:
        """The checks of ``prepare``, writing nothing (fail before a long run). Returns the earlier pyprune files
        (existing, relative, sorted) that the run would replace or remove."""
        replacing, _ = self._plan(overwrite, resume)
        return sorted(n for n in replacing if os.path.lexists(os.path.join(self.path, n)))

    def prepare(self, overwrite: bool = False, *, resume: bool = False) -> list[str]:
        """Check (as ``check``), create the directory, write the journal (so the directory reads as unfinished from
        now on), drop an earlier manifest, and remove temporaries of dead pyprune processes. ``resume=True``: this
        run can continue an unfinished resumable run found here (its claimed files count as written by this run),
        and its own journal is marked resumable. Returns the earlier files this run replaces (as ``check``)."""
        if self._prepared:
            raise RuntimeError(f"output directory {self.given!r} is already prepared")
        replacing, written = self._plan(overwrite, resume)
        os.makedirs(self.path, exist_ok=True)
        self.replaced = replacing
        self._written = dict.fromkeys(written)
        self._resumable = bool(resume)
        self._write_journal()
        manifest = os.path.join(self.path, MANIFEST_NAME)
        if os.path.lexists(manifest):
            os.unlink(manifest)
        for name in self._leftovers():
            path = os.path.normpath(os.path.join(self.path, name))
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            self.removed.append(name)
        self._prepared = True
        return sorted(n for n in replacing if os.path.lexists(os.path.join(self.path, n)))

    def _write_journal(self) -> None:
        _write_json(os.path.join(self.path, JOURNAL_NAME),
                    {"pyprune_unfinished": 1, "pid": os.getpid(), "resumable": self._resumable,
                     "replacing": self.replaced, "written": list(self._written)})

    def _require(self) -> None:
        if not self._prepared:
            raise RuntimeError(f"call prepare() on output directory {self.given!r} before writing into it")
        if self._finished:
            raise RuntimeError(f"output directory {self.given!r} is finished; start a new OutputDir to write again")

    def claim_all(self, names) -> list[str]:
        """``claim`` for several names at once (one journal write); nothing is claimed if one is refused."""
        self._require()
        norm = [_check_name(n) for n in names]
        replaced = set(self.replaced)
        paths = [self._path(n) for n in norm]
        for n, path in zip(norm, paths):
            if n not in self._written and n not in replaced and os.path.lexists(path):
                raise FileExistsError(f"{path!r} exists and was not written by pyprune (not in {MANIFEST_NAME}); "
                                      "pyprune never replaces files it did not write: move it away or choose another "
                                      "output directory")
        new = [n for n in dict.fromkeys(norm) if n not in self._written]
        if new:
            self._written.update(dict.fromkeys(new))
            self._write_journal()
        return paths

    def claim(self, name) -> str:
        """Register ``name`` (relative to the directory, '/' separators) as written by this run, *before* writing
        it: refused (FileExistsError) when a file of that name exists that pyprune did not write; ValueError for a
        name that escapes the directory or is reserved. Returns the absolute path to write (its parent directory
        may still have to be created). Write it atomically (temporary name + rename), e.g. with ``open``."""
        return self.claim_all([name])[0]

    @contextlib.contextmanager
    def open(self, name):
        """``claim(name)``, then a binary file that appears at its path only if the block ends without error
        (written to a ``.pyprune-tmp-<pid>-*`` name beside it, fsynced, renamed)."""
        path = self.claim(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _atomic(path) as f:
            yield f

    def discard(self, name) -> None:
        """Remove a file this run claimed (e.g. resume state that is not part of the output) and forget it."""
        self._require()
        n = _check_name(name)
        if n not in self._written:
            raise ValueError(f"{n!r} was not claimed by this run; pyprune removes only files it wrote")
        self._remove(n)
        del self._written[n]
        self._write_journal()

    def _remove(self, name: str) -> bool:
        path = self._path(name)
        if not os.path.lexists(path):
            return False
        os.unlink(path)
        parent = os.path.dirname(path)
        while parent != self.path and _inside(parent, self.path):
            try:
                os.rmdir(parent)  # only when empty: a directory left empty by removing pyprune's files
            except OSError:
                break
            parent = os.path.dirname(parent)
        return True

    def to_remove(self) -> list[str]:
        """What this run has removed and ``finish`` would remove now (relative names, sorted): the leftovers
        ``prepare`` cleared and the earlier output's files this run has not rewritten (so far)."""
        self._require()
        stale = [n for n in self.replaced if n not in self._written and os.path.lexists(self._path(n))]
        return sorted(dict.fromkeys(self.removed + stale))

    def finish(self) -> list[str]:
        """Complete the output: remove the earlier output's files this run did not rewrite (so no stale weights
        stay, e.g. an old model.safetensors beside new shards), write the manifest listing the claimed files that
        exist (state files the run deleted itself are left out), then remove the journal. Returns everything this
        run removed (relative names, sorted; also recorded in the manifest under "removed")."""
        self._require()
        for n in self.replaced:
            if n not in self._written and self._remove(n):
                self.removed.append(n)
        files = sorted(n for n in self._written if os.path.lexists(self._path(n)))
        removed = sorted(dict.fromkeys(self.removed))
        _write_json(os.path.join(self.path, MANIFEST_NAME),
                    {"pyprune_manifest": 1, "files": files, "removed": removed})
        os.unlink(os.path.join(self.path, JOURNAL_NAME))
        _fsync_dir(self.path)
        self._finished = True
        return removed


def _some(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
