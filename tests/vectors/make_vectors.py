#!/usr/bin/env python3
"""Regenerates the checkpoint test vectors in this directory, byte for byte.

Deliberately independent of every ckpt implementation (its own CRC-32C, its own manifest
writer) so that the vectors check the readers, not the other way round.

    python3 tests/vectors/make_vectors.py [OUTDIR]     # default: this directory
"""

import json
import os
import shutil
import sys
import zlib


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


SUMS = {"crc32c": crc32c, "crc32": crc32}

# The files of a valid checkpoint: a binary blob, a nested text file and an empty file.
FILES = {
    "state.bin": bytes(range(256)),
    "nested/deep/data.txt": b"hello, ckpt\n",
    "empty": b"",
}


def manifest_bytes(obj: dict, algo: str) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return body + b"\n" + f"{algo}:{SUMS[algo](body):08x}\n".encode()


# The files of a valid multi-rank checkpoint of 2 ranks (docs/multi-rank.md, "Checkpoint
# layout and validation"): one shard directory per rank, `rank-<r, 5 digits>/`.
RANK_FILES = {
    "rank-00000/state.bin": bytes(range(256)),
    "rank-00001/state.bin": bytes(range(255, -1, -1)),
    "rank-00001/nested/data.txt": b"hello, rank 1\n",
}

# `world_size` values that are not an unsigned 32-bit integer: every reader refuses them as a
# bad manifest, naming the field. JSON text, written as is.
BAD_WORLD_SIZES = {
    "world-size-negative": "-1",
    "world-size-2pow32": "4294967296",
    "world-size-float": "2.0",
    "world-size-string": '"2"',
    "world-size-null": "null",
    "world-size-bool": "true",
}


def manifest_obj(seq, step, algo, files, version=1, world=None):
    obj = {"format": "ckpt", "version": version, "seq": seq}
    if step is not None:
        obj["step"] = step
    obj.update(
        created_ms=1700000000000 + seq,
        writer="test-vectors/1",
        checksum=algo,
        files=[
            {"name": n, "size": len(files[n]), "sum": SUMS[algo](files[n])}
            for n in sorted(files, key=lambda n: n.encode())
        ],
    )
    if world is not None:
        obj["world_size"] = world
    obj["meta"] = {"note": "ckpt test vector"}
    return obj


def write_ckpt(path, files, manifest):
    os.makedirs(path)
    for name, data in files.items():
        p = os.path.join(path, *name.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    if manifest is not None:
        with open(os.path.join(path, "MANIFEST.ckpt"), "wb") as f:
            f.write(manifest)


def valid(path, algo, seq=1, step=42):
    write_ckpt(path, FILES, manifest_bytes(manifest_obj(seq, step, algo, FILES), algo))


def main(out):
    names = [
        "valid-crc32c", "valid-crc32", "flipped-byte", "truncated-file", "bad-trailer",
        "dotdot-name", "missing-file", "future-version", "no-manifest", "store",
        "valid-multi-rank", "missing-shard", *BAD_WORLD_SIZES,
    ]
    for n in names:
        shutil.rmtree(os.path.join(out, n), ignore_errors=True)
    j = lambda *p: os.path.join(out, *p)  # noqa: E731

    valid(j("valid-crc32c"), "crc32c")
    valid(j("valid-crc32"), "crc32")

    # One bit of a file's content flipped after the manifest was written.
    valid(j("flipped-byte"), "crc32c")
    with open(j("flipped-byte", "state.bin"), "r+b") as f:
        f.seek(100)
        f.write(bytes([100 ^ 0x01]))

    # A file cut short (a torn write that the manifest does not describe).
    valid(j("truncated-file"), "crc32c")
    with open(j("truncated-file", "state.bin"), "r+b") as f:
        f.truncate(200)

    # The manifest's trailer does not match its JSON line (last hex digit changed).
    valid(j("bad-trailer"), "crc32")
    mp = j("bad-trailer", "MANIFEST.ckpt")
    data = open(mp, "rb").read()
    last = data[-2:-1]
    data = data[:-2] + (b"0" if last != b"0" else b"1") + b"\n"
    open(mp, "wb").write(data)

    # A correctly checksummed manifest that lists a file outside the checkpoint.
    files = dict(FILES)
    files["../escape.txt"] = b"outside\n"
    m = manifest_bytes(manifest_obj(1, 42, "crc32c", files), "crc32c")
    write_ckpt(j("dotdot-name"), FILES, m)

    # A listed file is absent.
    valid(j("missing-file"), "crc32c")
    os.remove(j("missing-file", "nested", "deep", "data.txt"))

    # A manifest of a future version: refused with a hint to upgrade.
    m = manifest_bytes(manifest_obj(1, 42, "crc32c", FILES, version=2), "crc32c")
    write_ckpt(j("future-version"), FILES, m)

    # Files but no manifest: an incomplete save.
    write_ckpt(j("no-manifest"), FILES, None)

    # A checkpoint directory: 1 and 2 verify, 3 is corrupt, 4's manifest says seq 5.
    os.makedirs(j("store"))
    valid(j("store", "ckpt-000000000001"), "crc32c", seq=1, step=10)
    valid(j("store", "ckpt-000000000002"), "crc32", seq=2, step=20)
    valid(j("store", "ckpt-000000000003"), "crc32c", seq=3, step=30)
    with open(j("store", "ckpt-000000000003", "state.bin"), "r+b") as f:
        f.write(b"\xff")
    valid(j("store", "ckpt-000000000004"), "crc32c", seq=5, step=40)

    # A multi-rank checkpoint of 2 ranks (CRC-32, as both clients write shards).
    m = manifest_bytes(manifest_obj(1, 42, "crc32", RANK_FILES, world=2), "crc32")
    write_ckpt(j("valid-multi-rank"), RANK_FILES, m)

    # world_size 3 with shards of ranks 0 and 1 only.
    m = manifest_bytes(manifest_obj(1, 42, "crc32", RANK_FILES, world=3), "crc32")
    write_ckpt(j("missing-shard"), RANK_FILES, m)

    # world_size values that are not an unsigned 32-bit integer (the rest as valid-multi-rank).
    for name, text in BAD_WORLD_SIZES.items():
        body = manifest_bytes(manifest_obj(1, 42, "crc32", RANK_FILES, world=2), "crc32").split(b"\n")[0]
        body = body.replace(b'"world_size":2,', b'"world_size":' + text.encode() + b",")
        assert text.encode() in body
        write_ckpt(j(name), RANK_FILES, body + b"\n" + f"crc32:{crc32(body):08x}\n".encode())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
