"""Walking source folders (symlinks followed once, hidden files skipped), the listing hash that
decides whether a converted dataset can be reused, and file names safe for every tool."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Files that change without the dataset changing: Ultralytics' label caches, OS droppings.
_IGNORED_SUFFIXES = (".cache", ".lock")
# prepare() marks the results folder with this file: a walk never descends into one, so a results
# folder kept inside the dataset folder is neither imported nor part of the listing hash.
RESULTS_MARKER = ".yolo-tao-pipeline-results"
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f\ufffd]+")


@dataclass
class Tree:
    """Every file under a root (absolute paths, sorted) and the folder symlinks followed to find them."""

    root: Path
    files: list[Path] = field(default_factory=list)
    linked_dirs: list[str] = field(default_factory=list)


def walk(root: Path, skip: tuple[Path, ...] = ()) -> Tree:
    """Files under `root`; symlinked folders are followed once (cycles cut), dot-names and results folders skipped."""
    tree = Tree(root)
    skip_real = {os.path.realpath(s) for s in skip}
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if d.startswith(".") or real in seen or real in skip_real or os.path.exists(os.path.join(full, RESULTS_MARKER)):
                continue
            seen.add(real)
            if os.path.islink(full):
                tree.linked_dirs.append(os.path.relpath(full, root))
            keep.append(d)
        dirnames[:] = keep
        tree.files.extend(Path(dirpath, f) for f in sorted(filenames)
                          if not f.startswith(".") and not f.endswith(_IGNORED_SUFFIXES))
    return tree


def listing_hash(paths: list[Path], extra: str) -> str:
    """sha256 over (relative path, size, mtime) of every file under `paths`, plus `extra`.

    A file's content is not read: a changed file changes its size or mtime, and hashing 5,000
    images would cost more than converting them.
    """
    h = hashlib.sha256(extra.encode())
    for top in paths:
        files = [top] if top.is_file() else walk(top).files
        h.update(os.fsencode(top.name) + b"\1")
        for f in files:
            try:
                st = f.stat()
            except OSError:  # dangling symlink: part of the listing all the same
                st = None
            rel = os.fsencode(os.path.relpath(f, top)) if f != top else b""
            h.update(rel + b"\0" + (f"{st.st_size}:{st.st_mtime_ns}" if st else "missing").encode() + b"\n")
    return h.hexdigest()


def safe_stem(rel: str) -> tuple[str, bool]:
    """A flat file stem for a source path relative to its root; True when the name had to change.

    Folders become `__`; whitespace, control characters and bytes that are not UTF-8 become `_`.
    """
    raw = os.fsencode(rel)
    try:
        text = raw.decode("utf-8")
        bad = False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", errors="replace"), True
    stem = os.path.splitext(text)[0]
    given = [p for p in Path(stem).parts if p.strip("/\\")]  # no root anchor: "/x" is "x"
    parts = [_UNSAFE.sub("_", p) for p in given]
    renamed = bad or parts != list(Path(stem).parts)
    return "__".join(parts) or "image", renamed


def printable(path: str | Path) -> str:
    """A path for reports and messages, with undecodable bytes shown escaped."""
    return os.fsencode(str(path)).decode("utf-8", errors="backslashreplace")
