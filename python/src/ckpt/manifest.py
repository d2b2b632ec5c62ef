"""The manifest: the one file that makes a directory a checkpoint (``docs/protocol.md``,
"Manifest").

Byte format: ``MANIFEST.ckpt`` holds one UTF-8 JSON object on the first line, then a trailer
line ``<algo>:<8 lowercase hex digits>\\n`` giving the checksum of the JSON bytes (without their
newline) under the algorithm named in the JSON's ``checksum`` field. Everything read from disk
is bounded by the limits below. This module mirrors ``src/store/manifest.rs`` rule for rule.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ._crc import ALGOS, checksum
from .errors import ManifestError

__all__ = [
    "MANIFEST_NAME",
    "FORMAT",
    "VERSION",
    "MANIFEST_BYTES",
    "MAX_FILES",
    "NAME_BYTES",
    "NAME_DEPTH",
    "FileEntry",
    "Manifest",
    "check_name",
    "now_ms",
]

#: File name of the manifest inside a checkpoint directory (reserved for it).
MANIFEST_NAME = "MANIFEST.ckpt"
#: Value of the ``format`` field.
FORMAT = "ckpt"
#: Manifest version this code writes and the highest it reads.
VERSION = 1
#: Largest manifest file accepted, in bytes.
MANIFEST_BYTES = 4 << 20
#: Most files one checkpoint may list.
MAX_FILES = 100_000
#: Longest file name (a relative path), in UTF-8 bytes.
NAME_BYTES = 1024
#: Deepest nesting of a file name (number of ``/``-separated components).
NAME_DEPTH = 16

_U64 = (1 << 64) - 1
_HEX8 = re.compile(rb"[0-9a-f]{8}")


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def check_name(name: str) -> None:
    """Raises :class:`ManifestError` unless ``name`` is a safe relative path for a checkpoint
    file: not empty, at most 1024 UTF-8 bytes, not absolute, no NUL, not ``MANIFEST.ckpt``, no
    empty/``.``/``..`` components, at most 16 components."""

    def bad(why: str) -> None:
        raise ManifestError(f"bad file name {name!r}: {why}")

    if not isinstance(name, str):
        bad("not a string")
    if name == "":
        bad("empty")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        bad("not valid UTF-8")
        raise  # unreachable
    if len(raw) > NAME_BYTES:
        bad("longer than 1024 bytes")
    if name.startswith("/"):
        bad("absolute paths are not allowed")
    if "\0" in name:
        bad("contains a NUL byte")
    if name == MANIFEST_NAME:
        bad("reserved for ckpt's manifest")
    comps = name.split("/")
    for comp in comps:
        if comp == "":
            bad("empty path component (`//` or trailing `/`)")
        if comp in (".", ".."):
            bad("`.` and `..` components are not allowed")
    if len(comps) > NAME_DEPTH:
        bad("nested deeper than 16 directories")


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint."""

    #: Relative ``/``-separated path inside the checkpoint directory.
    name: str
    #: Size in bytes.
    size: int
    #: Checksum of the whole content under the manifest's algorithm.
    sum: int


@dataclass
class Manifest:
    """A parsed manifest."""

    seq: int
    created_ms: int
    writer: str
    checksum: str
    files: List[FileEntry]
    step: Optional[int] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION
    #: Number of ranks of a multi-rank checkpoint (files ``rank-NNNNN/<name>``, one shard per
    #: rank; ``docs/multi-rank.md``); ``None`` for a single process (= 1).
    world_size: Optional[int] = None

    @property
    def total_bytes(self) -> int:
        """Total size of the listed files."""
        return sum(f.size for f in self.files)

    def file(self, name: str) -> Optional[FileEntry]:
        """The entry named ``name``, if listed."""
        for f in self.files:
            if f.name == name:
                return f
        return None

    def json_bytes(self) -> bytes:
        """The JSON line (without its newline), keys in the order the Rust writer uses."""
        obj: Dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "seq": self.seq,
        }
        if self.step is not None:
            obj["step"] = self.step
        obj["created_ms"] = self.created_ms
        obj["writer"] = self.writer
        obj["checksum"] = self.checksum
        obj["files"] = [
            {"name": f.name, "size": f.size, "sum": f.sum}
            for f in sorted(self.files, key=lambda f: f.name.encode("utf-8"))
        ]
        if self.world_size is not None:
            obj["world_size"] = self.world_size
        if self.meta:
            obj["meta"] = self.meta
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )

    def encode(self) -> bytes:
        """The exact bytes of ``MANIFEST.ckpt``."""
        if self.checksum not in ALGOS:
            raise ValueError(f"unknown checksum algorithm {self.checksum!r}")
        body = self.json_bytes()
        return body + b"\n" + f"{self.checksum}:{checksum(self.checksum, body):08x}\n".encode()

    @staticmethod
    def decode(data: bytes) -> "Manifest":
        """Parses and validates untrusted manifest bytes; raises :class:`ManifestError`."""
        return _decode(data)


def _no_dup_keys(pairs: "list[tuple[str, Any]]") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"manifest is not valid JSON of the expected shape: duplicate field {k!r}")
        out[k] = v
    return out


#: Deepest JSON nesting a manifest may have: 127 levels, the top-level object being the first
#: (serde_json's limit in the Rust reader; docs/protocol.md section 7).
MAX_NESTING = 127


def _depth(obj: Any) -> int:
    """The nesting depth of parsed JSON (an object or array counts one level), iteratively."""
    deepest = 0
    todo = [(obj, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            items: Any = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        deepest = max(deepest, d)
        if d <= MAX_NESTING:
            todo.extend((x, d + 1) for x in items)
    return deepest


def check_world(world_size: int, files: "List[FileEntry]") -> None:
    """A multi-rank manifest's ``world_size`` against its files (as the Rust reader): at least
    1; every file named ``rank-<r, 5 digits or more>/<name>`` with ``r`` below it; every rank
    with at least one file (docs/multi-rank.md, "Checkpoint layout")."""

    def bad(why: str) -> ManifestError:
        return ManifestError(f"invalid multi-rank checkpoint: {why}")

    if world_size == 0:
        raise bad("world_size 0: a checkpoint has at least one rank")
    if world_size > len(files):
        raise bad(f"world_size {world_size} but {len(files)} file(s): every rank's shard holds at least one file")
    seen = [False] * world_size
    for f in files:
        m = _RANK_DIR.match(f.name)
        if m is None or f"{int(m.group(1)):05d}" != m.group(1) or int(m.group(1)) > 0xFFFFFFFF:
            raise bad(f"file {f.name!r} is not in a rank-NNNNN/ shard")
        r = int(m.group(1))
        if r >= world_size:
            raise bad(f"file {f.name!r} belongs to rank {r}, not below world_size {world_size}")
        seen[r] = True
    for r, ok in enumerate(seen):
        if not ok:
            raise bad(f"rank {r}'s shard is missing (no file rank-{r:05d}/...; world_size {world_size})")


_RANK_DIR = re.compile(r"rank-([0-9]{5,})/")


def _reject_constant(c: str) -> Any:
    raise ManifestError(f"manifest is not valid JSON of the expected shape: {c} is not JSON")


def _is_uint(v: Any, limit: int = _U64) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit


def _shape(msg: str) -> ManifestError:
    return ManifestError(f"manifest is not valid JSON of the expected shape: {msg}")


def _decode(data: bytes) -> Manifest:
    data = bytes(data)
    if len(data) > MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, more than the limit of {MANIFEST_BYTES}")
    if not data.endswith(b"\n"):
        raise ManifestError("manifest has no checksum trailer line (torn or truncated write)")
    body = data[:-1]
    split = body.rfind(b"\n")
    if split < 0:
        raise ManifestError("manifest has no checksum trailer line (torn or truncated write)")
    js, trailer = body[:split], body[split + 1 :]
    shown = trailer[:64].decode("utf-8", "replace")
    bad_trailer = ManifestError(f"manifest trailer {shown!r} is not `<algo>:<8 hex digits>`")
    algo_b, colon, hexd = trailer.partition(b":")
    if not colon:
        raise bad_trailer
    try:
        algo = algo_b.decode("ascii")
    except UnicodeDecodeError:
        raise bad_trailer from None
    if algo not in ALGOS or not _HEX8.fullmatch(hexd):
        raise bad_trailer
    expected = int(hexd, 16)
    actual = checksum(algo, js)
    if expected != actual:
        raise ManifestError(
            f"manifest checksum mismatch: trailer says {expected:08x}, content gives {actual:08x}"
        )
    try:
        text = js.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_dup_keys, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _shape(str(e)) from None
    if not isinstance(obj, dict):
        raise _shape("not a JSON object")
    if _depth(obj) > MAX_NESTING:
        raise _shape(f"nested more than {MAX_NESTING} levels deep")
    for k in ("format", "version"):
        if k not in obj:
            raise _shape(f"missing field `{k}`")
    if obj["format"] != FORMAT:
        raise ManifestError(f"manifest format is {json.dumps(obj['format'])}, expected \"ckpt\"")
    version = obj["version"]
    if not _is_uint(version):
        raise _shape(f"version {json.dumps(version)} is not a positive integer")
    if not 1 <= version <= VERSION:
        if version == 0:
            raise _shape("version 0 is not a positive integer")
        raise ManifestError(
            f"manifest version {version} is newer than this ckpt understands (max {VERSION}); "
            "hint: upgrade ckpt"
        )
    for k in ("seq", "created_ms", "writer", "checksum", "files"):
        if k not in obj:
            raise _shape(f"missing field `{k}`")
    if not _is_uint(obj["seq"]) or not _is_uint(obj["created_ms"]):
        raise _shape("seq and created_ms must be unsigned 64-bit integers")
    step = obj.get("step")
    if step is not None and not _is_uint(step):
        raise _shape("step must be null or an unsigned 64-bit integer")
    if not isinstance(obj["writer"], str):
        raise _shape("writer must be a string")
    if obj["checksum"] not in ALGOS:
        raise _shape(f"unknown checksum algorithm {json.dumps(obj['checksum'])}")
    # Present only as an integer: `null` is refused too (absent means a single process).
    world_size = obj.get("world_size")
    if "world_size" in obj and not _is_uint(world_size, 0xFFFFFFFF):
        raise _shape(f"world_size {json.dumps(world_size)} is not an unsigned 32-bit integer "
                     "(omitted for a single process)")
    meta = obj.get("meta", {})
    if meta is None or not isinstance(meta, dict):
        raise _shape("meta must be a JSON object")
    raw_files = obj["files"]
    if not isinstance(raw_files, list):
        raise _shape("files must be an array")
    if obj["checksum"] != algo:
        raise ManifestError(
            f"trailer algorithm {algo} differs from the manifest's checksum field {obj['checksum']}"
        )
    if len(raw_files) > MAX_FILES:
        raise ManifestError(f"manifest lists {len(raw_files)} files, more than the limit of {MAX_FILES}")
    files: List[FileEntry] = []
    for f in raw_files:
        if not isinstance(f, dict):
            raise _shape("each file must be an object")
        if not isinstance(f.get("name"), str):
            raise _shape("file name must be a string")
        if not _is_uint(f.get("size")) or not _is_uint(f.get("sum"), 0xFFFFFFFF):
            raise _shape(f"file {f['name']!r}: size must be a u64 and sum a u32")
        files.append(FileEntry(f["name"], f["size"], f["sum"]))
    seen = set()
    for f in files:
        check_name(f.name)
        if f.name in seen:
            raise ManifestError(f"manifest lists file {f.name!r} twice")
        seen.add(f.name)
    if world_size is not None:
        check_world(world_size, files)
    return Manifest(
        seq=obj["seq"],
        created_ms=obj["created_ms"],
        writer=obj["writer"],
        checksum=obj["checksum"],
        files=files,
        step=step,
        meta=meta,
        format=FORMAT,
        version=version,
        world_size=world_size,
    )
