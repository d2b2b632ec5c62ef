"""The two checksum algorithms of the manifest: ``crc32`` (IEEE, ``zlib.crc32``) and
``crc32c`` (Castagnoli).

CRC-32C comes from ``crc32c`` or ``google_crc32c`` when one of them is importable; otherwise a
pure-Python table implementation is used (correct, but only a few MB/s: fine for reading small
checkpoints written by other clients, which is the only time this client needs it unless asked).
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional

__all__ = ["ALGOS", "checksum", "combine", "Hasher", "crc32c_accelerated", "default_algo", "releases_gil"]

#: The algorithm names a manifest may carry.
ALGOS = ("crc32c", "crc32")


def _make_table() -> "list[int]":
    poly = 0x82F63B78  # reflected Castagnoli polynomial
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE: Optional["list[int]"] = None


def _crc32c_py(data: bytes, crc: int = 0) -> int:
    global _TABLE
    table = _TABLE
    if table is None:
        table = _TABLE = _make_table()
    c = crc ^ 0xFFFFFFFF
    for b in memoryview(data).cast("B"):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _load_fast() -> Optional[Callable[[bytes, int], int]]:
    # ``crc32c`` first: it takes any buffer (an ``mmap`` view: no copy) and releases the GIL
    # while it runs, so the bulk paths checksum beside their reads and writes. Both use the
    # CPU's CRC-32C instructions where there are some.
    try:  # pragma: no cover - depends on the environment
        import crc32c as _c  # type: ignore

        return lambda data, crc=0: _c.crc32c(data, crc)
    except Exception:
        pass
    try:  # pragma: no cover - depends on the environment
        import google_crc32c  # type: ignore

        if getattr(google_crc32c, "implementation", "c") == "c":
            # It accepts only objects that need no buffer release (bytes): a copy.
            return lambda data, crc=0: google_crc32c.extend(crc, data if isinstance(data, bytes) else bytes(data))
    except Exception:
        pass
    return None


_FAST: Optional[Callable[[bytes, int], int]] = None
_FAST_LOADED = False


def _crc32c_impl() -> Callable[..., int]:
    global _FAST, _FAST_LOADED
    if not _FAST_LOADED:
        _FAST = _load_fast()
        _FAST_LOADED = True
    return _FAST or _crc32c_py


def crc32c_accelerated() -> bool:
    """Whether a C implementation of CRC-32C is importable."""
    _crc32c_impl()
    return _FAST is not None


def default_algo() -> str:
    """The algorithm this client writes by default: ``crc32c`` when a C implementation is
    importable, else ``crc32`` (``zlib.crc32``, always fast)."""
    return "crc32c" if crc32c_accelerated() else "crc32"


def checksum(algo: str, data: bytes) -> int:
    """The checksum of ``data`` under ``algo`` as an unsigned 32-bit integer."""
    h = Hasher(algo)
    h.update(data)
    return h.value


class Hasher:
    """Streaming checksum for either algorithm."""

    __slots__ = ("algo", "_crc", "_fn")

    def __init__(self, algo: str) -> None:
        if algo == "crc32":
            self._fn: Callable[..., int] = zlib.crc32
        elif algo == "crc32c":
            self._fn = _crc32c_impl()
        else:
            raise ValueError(f"unknown checksum algorithm {algo!r} (expected one of {ALGOS})")
        self.algo = algo
        self._crc = 0

    def update(self, data: bytes) -> None:
        """Feeds more bytes."""
        if data:
            self._crc = self._fn(data, self._crc) & 0xFFFFFFFF

    @property
    def value(self) -> int:
        """The checksum of everything fed so far."""
        return self._crc

    def append(self, crc: int, length: int) -> None:
        """As if the ``length`` bytes whose checksum is ``crc`` were fed now (:func:`combine`)."""
        self._crc = combine(self.algo, self._crc, crc, length)


# --- combining the checksums of consecutive pieces ---------------------------------------------
# zlib's crc32_combine (1.2.12+: x^(8n) mod P by repeated squaring), written for either
# reflected polynomial: both algorithms share the conditioning (init and final xor 0xFFFFFFFF),
# so crc(A + B) = (crc(A) * x^(8 len(B)) mod P) xor crc(B). Lets pieces of one file be
# checksummed on several threads, in any order (the bulk reads of ``_bulk``).

_POLYS = {"crc32": 0xEDB88320, "crc32c": 0x82F63B78}
_X2N: "dict[str, list[int]]" = {}


def _multmodp(a: int, b: int, poly: int) -> int:
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1
    return p


def combine(algo: str, crc1: int, crc2: int, len2: int) -> int:
    """The checksum of A followed by B, from ``crc1`` (of A), ``crc2`` (of B) and ``len2``
    (B's length in bytes)."""
    poly = _POLYS[algo]
    table = _X2N.setdefault(algo, [1 << 30])  # table[k] = x^(2^k) mod P; table[0] = x^1
    p, k, n = 1 << 31, 3, len2  # x^0; x^(len2 * 2^3) = x^(8 len2)
    while n:
        # As many squarings as the length needs: zlib wraps k at 32, exact for CRC-32 (the
        # squares repeat every 32) but not for CRC-32C (every 31), where a piece of 512 MiB
        # or more got a wrong sum.
        while len(table) <= k:
            table.append(_multmodp(table[-1], table[-1], poly))
        if n & 1:
            p = _multmodp(table[k], p, poly)
        n >>= 1
        k += 1
    return _multmodp(p, crc1, poly) ^ crc2


def releases_gil(algo: str) -> bool:
    """Whether this algorithm's implementation here runs outside the GIL for large buffers
    (``zlib.crc32``, the ``crc32c`` and ``google_crc32c`` C modules), so that several threads
    checksum at once."""
    return algo == "crc32" or crc32c_accelerated()
