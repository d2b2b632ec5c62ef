"""The manifest codec mirrors src/store/manifest.rs rule for rule."""

import json

import pytest

from ckpt import FileEntry, Manifest, ManifestError, check_name


def sample(algo="crc32"):
    return Manifest(
        seq=7, created_ms=1, writer="test", checksum=algo, step=100,
        files=[FileEntry("b", 3, 1), FileEntry("a/x", 0, 0)], meta={"k": "v"},
    )


@pytest.mark.parametrize("algo", ["crc32", "crc32c"])
def test_round_trip_and_layout(algo):
    m = sample(algo)
    data = m.encode()
    d = Manifest.decode(data)
    assert d.seq == 7 and d.step == 100 and d.meta == {"k": "v"} and d.checksum == algo
    assert [f.name for f in d.files] == ["a/x", "b"], "files are sorted"
    body, trailer, end = data.split(b"\n")
    assert end == b"" and trailer.startswith(algo.encode() + b":") and len(trailer.split(b":")[1]) == 8
    assert list(json.loads(body)) == ["format", "version", "seq", "step", "created_ms", "writer", "checksum", "files", "meta"]


def test_every_bit_flip_is_rejected():
    data = sample().encode()
    for i in range(len(data)):
        for bit in range(8):
            b = bytearray(data)
            b[i] ^= 1 << bit
            with pytest.raises(ManifestError):
                Manifest.decode(bytes(b))


def test_every_truncation_is_rejected():
    data = sample("crc32c").encode()
    for n in range(len(data)):
        with pytest.raises(ManifestError):
            Manifest.decode(data[:n])


def test_hostile_names_are_rejected():
    for name in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/", ".", "MANIFEST.ckpt", "a\0b", "x" * 1025, "/".join("a" * 17)]:
        with pytest.raises(ManifestError):
            check_name(name)
    for name in ["model.pt", "a/b/c.bin", ".hidden", "..x", "MANIFEST.ckpt.bak", "/".join("a" * 16)]:
        check_name(name)


def _with_json(obj, algo="crc32"):
    m = sample(algo)
    body = json.dumps(obj, separators=(",", ":")).encode()
    from ckpt._crc import checksum
    return body + f"\n{algo}:{checksum(algo, body):08x}\n".encode()


def test_shape_errors_and_versions():
    base = json.loads(sample().encode().split(b"\n")[0])
    for change, match in [
        ({"version": 99}, "upgrade ckpt"),
        ({"format": "nope"}, "format"),
        ({"checksum": "crc32c"}, "differs"),
        ({"seq": -1}, "shape"),
        ({"seq": 1.0}, "shape"),
        ({"step": "3"}, "shape"),
        ({"files": [{"name": "a", "size": 1, "sum": 1}, {"name": "a", "size": 1, "sum": 1}]}, "twice"),
        ({"files": [{"name": "../a", "size": 1, "sum": 1}]}, "bad file name"),
        ({"files": [{"name": "a", "size": 1, "sum": 1 << 32}]}, "shape"),
        ({"meta": None}, "shape"),
    ]:
        obj = dict(base, **change)
        with pytest.raises(ManifestError, match=match):
            Manifest.decode(_with_json(obj))
    obj = dict(base)
    del obj["created_ms"]
    with pytest.raises(ManifestError, match="missing"):
        Manifest.decode(_with_json(obj))
    # Unknown fields are ignored (forward compatibility within a version).
    Manifest.decode(_with_json(dict(base, extra=1)))
    # step may be absent or null.
    obj = dict(base)
    del obj["step"]
    assert Manifest.decode(_with_json(obj)).step is None
    assert Manifest.decode(_with_json(dict(base, step=None))).step is None


def test_size_limit():
    with pytest.raises(ManifestError, match="limit"):
        Manifest.decode(b" " * ((4 << 20) + 1))
