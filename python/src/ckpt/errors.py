"""The exceptions of the ckpt client. Every message names what failed and, where there is one,
a hint."""

from __future__ import annotations

from typing import Optional

__all__ = ["CkptError", "ManifestError", "InvalidCheckpoint", "EnvError", "SLUGS"]

#: Why a checkpoint can fail verification: the same short names as the Rust reader uses
#: (quarantine file names, ``ckpt verify --json``, ``tests/vectors/expected.json``).
SLUGS = (
    "not-a-directory",
    "no-manifest",
    "bad-manifest",
    "seq-mismatch",
    "missing-file",
    "not-regular",
    "size-mismatch",
    "checksum-mismatch",
    "unreadable",
)


class CkptError(Exception):
    """Base class of every error raised by this package."""


class ManifestError(CkptError):
    """A manifest's bytes were rejected (torn, corrupt, a future version, a hostile name)."""

    slug = "bad-manifest"


class InvalidCheckpoint(CkptError):
    """A checkpoint did not verify. ``slug`` says why (one of :data:`SLUGS`), ``reason`` is the
    human-readable detail and ``path`` the checkpoint directory, when known."""

    def __init__(self, slug: str, reason: str, path: Optional[str] = None) -> None:
        assert slug in SLUGS, slug
        self.slug = slug
        self.reason = reason
        self.path = path
        super().__init__(f"checkpoint {path} is invalid: {reason}" if path else reason)

    def at(self, path: str) -> "InvalidCheckpoint":
        """The same error, naming ``path``."""
        return InvalidCheckpoint(self.slug, self.reason, path)


class EnvError(CkptError):
    """An environment variable set for the job is malformed."""
