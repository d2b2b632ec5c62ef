//! The manifest: the one file that makes a directory a checkpoint.
//!
//! Byte format (see `docs/protocol.md`, "Manifest"): the file `MANIFEST.ckpt` holds one UTF-8
//! JSON object on the first line, then a trailer line `<algo>:<8 lowercase hex digits>\n`
//! giving the checksum of the JSON bytes (without their newline) under the algorithm named in
//! the JSON's `checksum` field. Everything read from disk is bounded by [`limits`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// The file name of the manifest inside a checkpoint directory. Reserved: a job may not
/// save a file under this name.
pub const MANIFEST_NAME: &str = "MANIFEST.ckpt";
/// The value of the `format` field.
pub const FORMAT: &str = "ckpt";
/// The manifest version this code writes and the highest it reads.
pub const VERSION: u32 = 1;

/// Hard limits on untrusted manifest input.
pub mod limits {
    /// Largest manifest file accepted, in bytes.
    pub const MANIFEST_BYTES: u64 = 4 << 20;
    /// Most files one checkpoint may list.
    pub const FILES: usize = 100_000;
    /// Longest file name (a relative path), in bytes.
    pub const NAME_BYTES: usize = 1024;
    /// Deepest directory nesting of a file name.
    pub const NAME_DEPTH: usize = 16;
}

/// Which checksum the manifest's `sum` fields use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// CRC-32C (Castagnoli), the default of the Rust client and `ckpt save`.
    Crc32c,
    /// CRC-32 (IEEE, as Python's `zlib.crc32`), for clients without a fast CRC-32C.
    Crc32,
}

impl Algo {
    /// The name used in the manifest and its trailer.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Crc32c => "crc32c",
            Algo::Crc32 => "crc32",
        }
    }
    fn from_name(s: &str) -> Option<Algo> {
        match s {
            "crc32c" => Some(Algo::Crc32c),
            "crc32" => Some(Algo::Crc32),
            _ => None,
        }
    }
    /// A fresh streaming hasher for this algorithm.
    pub fn hasher(self) -> Hasher {
        Hasher {
            algo: self,
            state: 0,
            crc32: crc32fast::Hasher::new(),
        }
    }
    /// The checksum of `data` in one call.
    pub fn checksum(self, data: &[u8]) -> u32 {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }
}

/// Streaming checksum computation for either [`Algo`].
#[derive(Clone)]
pub struct Hasher {
    algo: Algo,
    state: u32,
    crc32: crc32fast::Hasher,
}

impl Hasher {
    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self.algo {
            Algo::Crc32c => self.state = crc32c::crc32c_append(self.state, data),
            Algo::Crc32 => self.crc32.update(data),
        }
    }
    /// The checksum of everything fed so far.
    pub fn finish(&self) -> u32 {
        match self.algo {
            Algo::Crc32c => self.state,
            Algo::Crc32 => self.crc32.clone().finalize(),
        }
    }
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path inside the checkpoint directory, `/`-separated.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Checksum of the whole content under the manifest's algorithm.
    pub sum: u32,
}

/// The parsed manifest of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"ckpt"`.
    pub format: String,
    /// Format version; readers refuse versions above [`VERSION`].
    pub version: u32,
    /// Sequence number; equals the number in the directory name `ckpt-<seq>`.
    pub seq: u64,
    /// The job's step counter at the save, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Wall-clock time of the commit, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Who wrote it, e.g. `ckpt-rust/0.1.0`, `ckpt-save/0.1.0`, `ckpt-python/0.1.0`.
    pub writer: String,
    /// Algorithm of every `sum` (and of the trailer).
    pub checksum: Algo,
    /// Every file of the checkpoint, sorted by name.
    pub files: Vec<FileEntry>,
    /// Number of ranks of a multi-rank checkpoint (files `rank-NNNNN/<name>`, one shard per
    /// rank; `docs/multi-rank.md`); omitted for a single process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    /// Free-form user metadata (a JSON object).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Why a manifest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the limit of {max}", max = limits::MANIFEST_BYTES)]
    TooLarge(u64),
    #[error("manifest has no checksum trailer line (torn or truncated write)")]
    NoTrailer,
    #[error("manifest trailer {0:?} is not `<algo>:<8 hex digits>`")]
    BadTrailer(String),
    #[error("manifest checksum mismatch: trailer says {expected:08x}, content gives {actual:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("manifest is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error("manifest format is {0:?}, expected \"ckpt\"")]
    Format(String),
    #[error("manifest version {0} is newer than this ckpt understands (max {VERSION}); hint: upgrade ckpt")]
    Version(u32),
    #[error("trailer algorithm {trailer} differs from the manifest's checksum field {field}")]
    AlgoMismatch { trailer: String, field: String },
    #[error("manifest lists {0} files, more than the limit of {max}", max = limits::FILES)]
    TooManyFiles(usize),
    #[error("manifest lists file {0:?} twice")]
    Duplicate(String),
    #[error("bad file name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
}

/// Checks that `name` is a safe relative path for a checkpoint file: no absolute path, no
/// `.`/`..`/empty components, no NUL, not the reserved manifest name, bounded length/depth.
pub fn check_name(name: &str) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > limits::NAME_BYTES {
        return bad("longer than 1024 bytes");
    }
    if name.starts_with('/') {
        return bad("absolute paths are not allowed");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    if name == MANIFEST_NAME {
        return bad("reserved for ckpt's manifest");
    }
    let mut depth = 0;
    for comp in name.split('/') {
        depth += 1;
        match comp {
            "" => return bad("empty path component (`//` or trailing `/`)"),
            "." | ".." => return bad("`.` and `..` components are not allowed"),
            _ => {}
        }
    }
    if depth > limits::NAME_DEPTH {
        return bad("nested deeper than 16 directories");
    }
    Ok(())
}

impl Manifest {
    /// A new version-1 manifest. `files` is sorted here.
    pub fn new(
        seq: u64,
        step: Option<u64>,
        writer: &str,
        checksum: Algo,
        mut files: Vec<FileEntry>,
    ) -> Self {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Manifest {
            format: FORMAT.to_string(),
            version: VERSION,
            seq,
            step,
            created_ms: now_ms(),
            writer: writer.to_string(),
            checksum,
            files,
            world_size: None,
            meta: Default::default(),
        }
    }

    /// Total size of the listed files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The exact bytes of `MANIFEST.ckpt`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("a manifest always serialises");
        let sum = self.checksum.checksum(&out);
        out.extend_from_slice(format!("\n{}:{:08x}\n", self.checksum.name(), sum).as_bytes());
        out
    }

    /// Parses and validates untrusted manifest bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > limits::MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len() as u64));
        }
        let body = bytes.strip_suffix(b"\n").ok_or(ManifestError::NoTrailer)?;
        let split = body
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or(ManifestError::NoTrailer)?;
        let (json, trailer) = (&body[..split], &body[split + 1..]);
        let trailer = std::str::from_utf8(trailer).map_err(|_| {
            ManifestError::BadTrailer(String::from_utf8_lossy(trailer).into_owned())
        })?;
        let bad_trailer = || ManifestError::BadTrailer(trailer.chars().take(64).collect());
        let (algo_name, hex) = trailer.split_once(':').ok_or_else(bad_trailer)?;
        let algo = Algo::from_name(algo_name).ok_or_else(bad_trailer)?;
        if hex.len() != 8
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad_trailer());
        }
        let expected = u32::from_str_radix(hex, 16).map_err(|_| bad_trailer())?;
        let actual = algo.checksum(json);
        if expected != actual {
            return Err(ManifestError::Checksum { expected, actual });
        }
        // Peek at format/version first so a future version gets the right message.
        #[derive(Deserialize)]
        struct Head {
            format: serde_json::Value,
            version: serde_json::Value,
        }
        let head: Head =
            serde_json::from_slice(json).map_err(|e| ManifestError::Json(e.to_string()))?;
        if head.format != serde_json::Value::String(FORMAT.into()) {
            return Err(ManifestError::Format(head.format.to_string()));
        }
        match head.version.as_u64() {
            Some(v) if v >= 1 && v <= VERSION as u64 => {}
            Some(v) => return Err(ManifestError::Version(v.min(u32::MAX as u64) as u32)),
            None => {
                return Err(ManifestError::Json(format!(
                    "version {} is not a positive integer",
                    head.version
                )))
            }
        }
        let m: Manifest =
            serde_json::from_slice(json).map_err(|e| ManifestError::Json(e.to_string()))?;
        if m.checksum != algo {
            return Err(ManifestError::AlgoMismatch {
                trailer: algo.name().into(),
                field: m.checksum.name().into(),
            });
        }
        if m.files.len() > limits::FILES {
            return Err(ManifestError::TooManyFiles(m.files.len()));
        }
        let mut seen = std::collections::HashSet::with_capacity(m.files.len());
        for f in &m.files {
            check_name(&f.name)?;
            if !seen.insert(f.name.as_str()) {
                return Err(ManifestError::Duplicate(f.name.clone()));
            }
        }
        Ok(m)
    }
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "checkpoint {}", self.seq)?;
        if let Some(step) = self.step {
            write!(f, " (step {step})")?;
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest::new(
            7,
            Some(100),
            "test",
            Algo::Crc32c,
            vec![
                FileEntry {
                    name: "b".into(),
                    size: 3,
                    sum: 1,
                },
                FileEntry {
                    name: "a/x".into(),
                    size: 0,
                    sum: 0,
                },
            ],
        )
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.files[0].name, "a/x", "files are sorted");
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    Manifest::decode(&b).is_err(),
                    "flip of bit {bit} at byte {i} accepted"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..n]).is_err(),
                "truncation to {n} bytes accepted"
            );
        }
    }

    #[test]
    fn hostile_names_are_rejected() {
        for name in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            ".",
            MANIFEST_NAME,
            "a\0b",
        ] {
            assert!(check_name(name).is_err(), "{name:?} accepted");
        }
        for name in [
            "model.pt",
            "a/b/c.bin",
            ".hidden",
            "..x",
            "MANIFEST.ckpt.bak",
        ] {
            check_name(name).unwrap();
        }
    }

    #[test]
    fn future_version_names_the_fix() {
        let mut m = sample();
        m.version = 99;
        let err = Manifest::decode(&m.encode()).unwrap_err();
        assert!(err.to_string().contains("upgrade ckpt"), "{err}");
    }

    #[test]
    fn crc32_variant_matches_zlib() {
        // zlib.crc32(b"123456789") == 0xcbf43926, crc32c == 0xe3069283
        assert_eq!(Algo::Crc32.checksum(b"123456789"), 0xcbf4_3926);
        assert_eq!(Algo::Crc32c.checksum(b"123456789"), 0xe306_9283);
    }
}
