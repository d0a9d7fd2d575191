"""A Faspex package as files: its public link, its listing and root .sums, the paths that are
safe to write, and the parts it is received in (each fits the scratch a worker may use)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UsageError
from ..logs import printable

# What a part costs in scratch beyond its files' bytes: per file, tar's header and padding
# (and a pax header for a long name) and ascp's .aspera-ckpt; per part, xz's headers and
# index; and 1/10,000 of the bytes for what xz adds to data it cannot compress (LZMA2 stores
# such data in chunks of 64 KiB with a 3-byte header each: 1/20,000).
FILE_OVERHEAD = 4096
PART_OVERHEAD = 64 << 10
NAME_LIMIT = 255                # bytes of one path component (the listing's own limit, too)
PATH_LIMIT = 4096
SUMS_LINE = re.compile(r"^([0-9A-Fa-f]{32}) {1,2}\*?(.+?)\s*$")
# Names that collection files of the output have (LICENSE, CITATION.md, metadata.csv,
# MD5SUMS, with a part's suffix), or that --verify reads as such (MD5SUMS*, metadata*): a
# package file at the root by such a name gets a "package-" before it.
COLLECTION_FILE_LIKE = re.compile(r"^(license|citation|metadata|md5sums)", re.IGNORECASE)
ASCP_OWN = (".partial", ".aspera-ckpt")   # ascp's names for files still arriving
# Items asked for by one receive: each is an argument of ascli's command line, which the
# kernel bounds (ARG_MAX, 2 MB with the environment; 1,000 paths of 255 bytes are 256 kB).
ITEMS_PER_RECEIVE = 1000


# -- the link ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageLink:
    """A Faspex 5 public link (…/public/package?context=<base64 JSON>): its package id, and
    what in it must never be written down (the link, its context, the passcode)."""
    url: str
    host: str
    package_id: str
    secrets: tuple[str, ...]


def parse_link(url: str) -> PackageLink:
    """UsageError when it is not a Faspex public link whose context names a package."""
    parts = urlsplit(url.strip())
    contexts = parse_qs(parts.query).get("context", [])
    if parts.scheme != "https" or not parts.hostname or len(contexts) != 1:
        raise UsageError("--aspera-url: give a Faspex public link as copied from the "
                         "collection's page (https://.../public/package?context=...)")
    context = contexts[0]
    try:
        decoded = json.loads(base64.b64decode(context.replace("-", "+").replace("_", "/") +
                                              "=" * (-len(context) % 4)))
    except (ValueError, binascii.Error):
        decoded = None
    package_id = str(decoded.get("package_id") or decoded.get("id") or "") \
        if isinstance(decoded, dict) else ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", package_id):
        raise UsageError("--aspera-url: the link's context names no package; copy the whole "
                         "link from the collection's page")
    passcode = str(decoded.get("passcode") or "")
    secrets = tuple(s for s in {url.strip(), context, unquote(context), passcode,
                                parts.query} if s)
    return PackageLink(url.strip(), parts.hostname, package_id, secrets)


# -- paths ---------------------------------------------------------------------------------


def path_refusal(path: str) -> Optional[str]:
    """Why a package path must not be written (None: it is safe). The listing's and the
    .sums' paths are relative to the package root, without a leading slash."""
    if not path:
        return "an empty path"
    if len(path.encode("utf-8", "surrogatepass")) > PATH_LIMIT:
        return "a path longer than 4096 bytes"
    if re.search(r"[\x00-\x1f\x7f-\x9f]", path):
        return "control characters in its path"
    if "\\" in path:
        return "a backslash in its path"
    if path.startswith("/"):
        return "an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "a path that leaves the package (..)"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' component in its path"
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_LIMIT for part in parts):
        return "a name longer than 255 bytes"
    if parts[-1].endswith(ASCP_OWN):
        return "a name that ascp gives its unfinished files"
    return None


def listed_path(item_path: str, folder: str) -> str:
    """An item's path relative to the package root: a root listing gives '/name', a folder's
    listing 'folder/name' (aspera.md); exactly one leading slash is the root's."""
    return item_path[1:] if item_path.startswith("/") and folder == "" else item_path


def output_path(path: str) -> str:
    """Where a package file goes under its collection folder: its own path, except that a
    root file named like a collection file of the output gets "package-" before its name."""
    return f"package-{path}" if "/" not in path and COLLECTION_FILE_LIKE.match(path) else path


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def relative_to(path: str, folder: str) -> str:
    return path[len(folder) + 1:] if folder else path


# -- listing and .sums ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A file or folder of the package's listing."""
    path: str            # relative to the package root
    kind: str            # "file" or "directory"
    size: int = 0


@dataclass
class Listing:
    """What the listing of a package found: its entries, and what was refused."""
    entries: dict[str, Entry] = field(default_factory=dict)
    refused: list[tuple[str, str]] = field(default_factory=list)    # (path, why)

    def files(self) -> dict[str, Entry]:
        return {p: e for p, e in self.entries.items() if e.kind == "file"}

    def folders(self) -> list[str]:
        return sorted(p for p, e in self.entries.items() if e.kind == "directory")


def as_size(value: object) -> Optional[int]:
    """A listing's size: a number, or a string of digits (Faspex's schema says string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return None


def add_items(listing: Listing, items: list[dict], folder: str) -> list[str]:
    """The items of one folder's listing (or of a recursive one from folder) into listing;
    returns the folders found. A `symbolic_link` item stands for its target (its own size is
    the link's); an item whose path is unsafe, or not below folder, is refused."""
    found = []
    for item in items:
        raw = item.get("path")
        if not isinstance(raw, str):
            listing.refused.append((printable(str(raw))[:200], "a listing item without a path"))
            continue
        path = listed_path(raw, folder)
        kind, size = item.get("type"), as_size(item.get("size"))
        if kind == "symbolic_link" and isinstance(item.get("target"), dict):
            kind, size = item["target"].get("type"), as_size(item["target"].get("size"))
        why = path_refusal(path)
        if why is None and folder and not path.startswith(folder + "/"):
            why = f"listed in {folder}/ but not below it"
        if why is None and kind not in ("file", "directory"):
            why = f"an item of type {printable(str(kind))[:40]}"
        if why is None and kind == "file" and size is None:
            why = "a file without a size"
        if why is not None:
            listing.refused.append((printable(raw)[:300], why))
            continue
        listing.entries[path] = Entry(path, str(kind), size or 0)
        if kind == "directory":
            found.append(path)
    return found


@dataclass
class Sums:
    """A .sums file read: path -> MD5, and its lines that were not '<md5> <path>'."""
    md5: dict[str, str] = field(default_factory=dict)
    bad_lines: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)


def read_sums(text: str, sums: Sums) -> None:
    """TCIA's .sums (aspera.md): one '<md5> <relative path>' line per file, not always
    sorted, one or two spaces (md5sum's format, a '*' of its binary mode tolerated); a
    leading './' or '/' is dropped. A path listed twice with two MD5s is refused."""
    conflicting = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        match = SUMS_LINE.match(line)
        if not match:
            sums.bad_lines += 1
            continue
        md5, path = match[1].lower(), match[2]
        path = path[2:] if path.startswith("./") else path.lstrip("/")
        why = path_refusal(path)
        if why is not None:
            sums.refused.append((printable(path)[:300], why))
            continue
        if sums.md5.get(path, md5) != md5:
            conflicting.add(path)
        sums.md5[path] = md5
    for path in conflicting:
        del sums.md5[path]
        sums.refused.append((path, "listed twice in the .sums, with two MD5s"))


# -- the files to receive, and the parts -------------------------------------------------


@dataclass(frozen=True)
class PackageFile:
    path: str            # relative to the package root, as the listing and .sums give it
    size: int
    md5: str

    @property
    def output(self) -> str:
        return output_path(self.path)


@dataclass
class Part:
    """Files received by one ascli run: items (files, or whole folders) of one folder of
    the package, asked for as /<folder>/<item>; each lands at <receive folder>/<item>."""
    folder: str
    items: list[str]
    files: list[PackageFile]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def need(self) -> int:
        return scratch_need(self.files)

    def remote_paths(self) -> list[str]:
        return ["/" + (f"{self.folder}/{item}" if self.folder else item) for item in self.items]

    def received_at(self, file: PackageFile) -> str:
        """Where a file lands under the receive folder."""
        return relative_to(file.path, self.folder)

    def member(self, file: PackageFile) -> str:
        """Its name under the part's folder in the output."""
        return relative_to(file.output, self.folder)

    def uid(self, package_id: str) -> str:
        """A DICOM-shaped UID (2.25.<128-bit number>, PS3.5 B.2), the same for the same files
        of the same package: manifests of failed or damaged parts (.failed.tcia) list it."""
        digest = hashlib.sha256("\n".join([package_id, self.folder] + sorted(
            f.path for f in self.files)).encode("utf-8", "surrogatepass")).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def scratch_need(files: Iterable[PackageFile]) -> int:
    """Scratch a part of these files takes at most: the files as they arrive, then as they
    are packed (each file is deleted once packed: never both whole), plus overheads."""
    files = list(files)
    size = sum(f.size for f in files)
    return size + size // 10_000 + FILE_OVERHEAD * len(files) + PART_OVERHEAD


@dataclass
class Tree:
    """The package's folders: the planned files directly in each, its sub-folders, and the
    folders that hold something that must not be asked for whole (a file left out, one
    already in the output)."""
    files: dict[str, list[PackageFile]] = field(default_factory=lambda: defaultdict(list))
    children: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    not_whole: set[str] = field(default_factory=set)

    def add_folder(self, folder: str) -> None:
        while folder:
            self.children[parent_of(folder)].add(folder)
            folder = parent_of(folder)

    def mark_not_whole(self, path: str) -> None:
        """A file at path must not be received: no folder above it may be asked for whole."""
        folder = parent_of(path)
        while True:
            self.not_whole.add(folder)
            if not folder:
                return
            folder = parent_of(folder)

    def subtree(self, folder: str) -> list[PackageFile]:
        found = list(self.files.get(folder, []))
        for child in sorted(self.children.get(folder, ())):
            found += self.subtree(child)
        return found


def build_tree(planned: list[PackageFile], skipped: Iterable[str],
               folders: Iterable[str]) -> Tree:
    """skipped: paths of the listing that are not received (left out, or in the output)."""
    tree = Tree()
    for folder in folders:
        tree.add_folder(folder)
    for file in planned:
        tree.files[parent_of(file.path)].append(file)
        tree.add_folder(parent_of(file.path))
    for path in skipped:
        tree.mark_not_whole(path)
    return tree


def plan_parts(tree: Tree, budget: int, folder: str = "") -> list[Part]:
    """Parts of at most budget bytes of scratch (scratch_need), in name order: a folder that
    fits and holds only planned files is one item; a larger one is planned on its own."""
    units: list[tuple[str, list[PackageFile]]] = [
        (relative_to(f.path, folder), [f]) for f in tree.files.get(folder, [])]
    parts: list[Part] = []
    for child in sorted(tree.children.get(folder, ())):
        files = tree.subtree(child)
        if not files:
            continue
        if child not in tree.not_whole and scratch_need(files) <= budget:
            units.append((relative_to(child, folder), files))
        else:
            parts += plan_parts(tree, budget, child)
    current: Optional[Part] = None
    for name, files in sorted(units, key=lambda unit: unit[0]):
        if current is None or len(current.items) >= ITEMS_PER_RECEIVE or \
                scratch_need(current.files + files) > budget:
            current = Part(folder, [], [])
            parts.append(current)
        current.items.append(name)
        current.files += files
    return parts


def describe_folder(folder: str) -> str:
    return "/" + folder if folder else "/ (the package's root)"
