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
            len: 0,
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
    /// Bytes fed so far (for [`Hasher::combine`]).
    len: u64,
    crc32: crc32fast::Hasher,
}

impl Hasher {
    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self.algo {
            Algo::Crc32c => self.state = crc32c::crc32c_append(self.state, data),
            Algo::Crc32 => self.crc32.update(data),
        }
        self.len += data.len() as u64;
    }
    /// Appends what `next` was fed, as if this hasher had been fed those bytes after its own
    /// (the checksum of a file from the checksums of its consecutive pieces, computed on
    /// several threads). Both must be of the same algorithm.
    pub fn combine(&mut self, next: &Hasher) {
        debug_assert_eq!(self.algo, next.algo);
        match self.algo {
            Algo::Crc32c => {
                self.state = crc32c::crc32c_combine(self.state, next.state, next.len as usize)
            }
            Algo::Crc32 => self.crc32.combine(&next.crc32),
        }
        self.len += next.len;
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
    /// rank; `docs/multi-rank.md`); omitted for a single process. When present it must be an
    /// unsigned 32-bit integer (`null`, `-1`, `2.0`, `"2"` are refused, naming the field).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::world_size"
    )]
    pub world_size: Option<u32>,
    /// Free-form user metadata (a JSON object; a key twice at any depth is rejected).
    #[serde(
        default,
        skip_serializing_if = "serde_json::Map::is_empty",
        deserialize_with = "strict::meta"
    )]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// `meta` parsed like `serde_json::Value` except that an object with a key twice is an error
/// (`docs/protocol.md`: readers reject duplicate keys; serde_json's own map keeps the last).
mod strict {
    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};
    use std::fmt;

    pub fn meta<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
        match StrictValue::deserialize(d)?.0 {
            Value::Object(m) => Ok(m),
            v => Err(de::Error::custom(format!(
                "meta must be a JSON object, not {v}"
            ))),
        }
    }

    /// `world_size`, when present: an unsigned 32-bit integer and nothing else (not `null`,
    /// which serde would read as absent), with errors that name the field (serde_json's own
    /// say only "expected u32").
    pub fn world_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        struct W;
        impl Visitor<'_> for W {
            type Value = u32;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("world_size as an unsigned 32-bit integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
                u32::try_from(v).map_err(|_| {
                    E::custom(format!(
                        "world_size {v} is not an unsigned 32-bit integer (at most {})",
                        u32::MAX
                    ))
                })
            }
        }
        d.deserialize_u32(W).map(Some)
    }

    struct StrictValue(Value);

    impl<'de> Deserialize<'de> for StrictValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(V)
        }
    }

    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = StrictValue;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
            Ok(StrictValue(Value::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
            Ok(StrictValue(v.into()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
            Ok(StrictValue(v.into()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
            Ok(StrictValue(
                serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
            ))
        }
        fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
            Ok(StrictValue(Value::String(v.to_string())))
        }
        fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
            Ok(StrictValue(Value::String(v)))
        }
        fn visit_unit<E>(self) -> Result<StrictValue, E> {
            Ok(StrictValue(Value::Null))
        }
        fn visit_none<E>(self) -> Result<StrictValue, E> {
            Ok(StrictValue(Value::Null))
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
            StrictValue::deserialize(d)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
            let mut v = Vec::new();
            while let Some(StrictValue(x)) = seq.next_element()? {
                v.push(x);
            }
            Ok(StrictValue(Value::Array(v)))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
            let mut m = Map::new();
            while let Some(k) = map.next_key::<String>()? {
                if m.contains_key(&k) {
                    return Err(de::Error::custom(format!("duplicate key {k:?} in meta")));
                }
                let StrictValue(x) = map.next_value()?;
                m.insert(k, x);
            }
            Ok(StrictValue(Value::Object(m)))
        }
    }
}

/// Checks a multi-rank manifest's `world_size` against its files (`docs/multi-rank.md`,
/// "Checkpoint layout"): at least 1; every file named `rank-<r, 5 digits or more>/<name>` with
/// `r` below it; every rank with at least one file.
fn check_world(world_size: u32, files: &[FileEntry]) -> Result<(), ManifestError> {
    let bad = |why: String| Err(ManifestError::World(why));
    if world_size == 0 {
        return bad("world_size 0: a checkpoint has at least one rank".into());
    }
    if world_size as usize > files.len() {
        return bad(format!(
            "world_size {world_size} but {} file(s): every rank's shard holds at least one file",
            files.len()
        ));
    }
    let mut seen = vec![false; world_size as usize];
    for f in files {
        let rank = f
            .name
            .strip_prefix("rank-")
            .and_then(|r| r.split_once('/'))
            .and_then(|(digits, _)| {
                let r: u32 = digits.parse().ok()?;
                (digits.len() >= 5 && format!("{r:05}") == digits).then_some(r)
            });
        match rank {
            None => return bad(format!("file {:?} is not in a rank-NNNNN/ shard", f.name)),
            Some(r) if r >= world_size => {
                return bad(format!(
                    "file {:?} belongs to rank {r}, not below world_size {world_size}",
                    f.name
                ))
            }
            Some(r) => seen[r as usize] = true,
        }
    }
    if let Some(r) = seen.iter().position(|s| !s) {
        return bad(format!(
            "rank {r}'s shard is missing (no file rank-{r:05}/...; world_size {world_size})"
        ));
    }
    Ok(())
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
    #[error("invalid multi-rank checkpoint: {0}")]
    World(String),
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
        if let Some(n) = m.world_size {
            check_world(n, &m.files)?;
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

    fn world(n: Option<u32>, names: &[&str]) -> Vec<u8> {
        let files = names
            .iter()
            .map(|n| FileEntry {
                name: n.to_string(),
                size: 0,
                sum: 0,
            })
            .collect();
        let mut m = Manifest::new(1, Some(3), "test", Algo::Crc32, files);
        m.world_size = n;
        m.encode()
    }

    #[test]
    fn invalid_world_sizes_are_rejected() {
        Manifest::decode(&world(Some(2), &["rank-00000/a", "rank-00001/a"])).unwrap();
        Manifest::decode(&world(Some(1), &["rank-00000/a"])).unwrap();
        for (n, names, why) in [
            (0, &["rank-00000/a"][..], "world_size 0"),
            (
                2,
                &["rank-00000/a", "rank-00002/a"],
                "not below world_size 2",
            ),
            (
                3,
                &["rank-00000/a", "rank-00001/a", "rank-00001/b"],
                "rank 2's shard is missing",
            ),
            (
                2,
                &["rank-00000/a", "rank-1/a"],
                "not in a rank-NNNNN/ shard",
            ),
            (2, &["rank-00000/a", "other"], "not in a rank-NNNNN/ shard"),
            (
                2,
                &["rank-00000/a", "rank-000001/a"],
                "not in a rank-NNNNN/ shard",
            ),
            (
                u32::MAX,
                &["rank-00000/a"],
                "every rank's shard holds at least one file",
            ),
        ] {
            let err = Manifest::decode(&world(Some(n), names)).unwrap_err();
            assert!(err.to_string().contains(why), "{n} {names:?}: {err}");
        }
    }

    /// A `world_size` that is not an unsigned 32-bit integer is refused with a message naming
    /// the field (`null` too: serde alone read it as absent, a single-process checkpoint).
    /// The same values as python/tests/test_multi_rank.py and tests/vectors/world-size-*.
    #[test]
    fn world_sizes_that_are_not_u32_are_refused_naming_the_field() {
        let enc = |ws: &str| {
            let mut b = format!(
                r#"{{"format":"ckpt","version":1,"seq":1,"step":3,"created_ms":1,"writer":"t","checksum":"crc32","files":[{{"name":"rank-00000/a","size":0,"sum":0}},{{"name":"rank-00001/a","size":0,"sum":0}}],"world_size":{ws}}}"#
            )
            .into_bytes();
            let sum = Algo::Crc32.checksum(&b);
            b.extend_from_slice(format!("\ncrc32:{sum:08x}\n").as_bytes());
            b
        };
        assert_eq!(Manifest::decode(&enc("2")).unwrap().world_size, Some(2));
        for ws in [
            "-1",
            "4294967296",
            "18446744073709551616",
            "2.0",
            "2e0",
            r#""2""#,
            "null",
            "true",
            "[2]",
            r#"{"n":2}"#,
        ] {
            let err = Manifest::decode(&enc(ws)).unwrap_err();
            assert!(
                matches!(err, ManifestError::Json(_)) && err.to_string().contains("world_size"),
                "world_size {ws}: {err}"
            );
        }
    }

    #[test]
    fn duplicate_keys_in_meta_are_rejected() {
        let enc = |json: &str| {
            let mut b = json.as_bytes().to_vec();
            let sum = Algo::Crc32.checksum(&b);
            b.extend_from_slice(format!("\ncrc32:{sum:08x}\n").as_bytes());
            b
        };
        let head = r#"{"format":"ckpt","version":1,"seq":1,"created_ms":0,"writer":"t","checksum":"crc32","files":[]"#;
        let ok = Manifest::decode(&enc(&format!(
            r#"{head},"meta":{{"a":{{"b":1,"c":[{{"d":null}}]}}}}}}"#
        )))
        .unwrap();
        assert_eq!(ok.meta["a"]["c"][0]["d"], serde_json::Value::Null);
        for meta in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":{"b":1,"b":1}}"#,
            r#"{"x":[{"k":1,"k":2}]}"#,
        ] {
            let err = Manifest::decode(&enc(&format!(r#"{head},"meta":{meta}}}"#))).unwrap_err();
            assert!(err.to_string().contains("duplicate key"), "{meta}: {err}");
        }
        // Nesting: 127 levels in all (the top-level object is the first) are accepted, 128 not.
        let nest = |depth: usize| {
            let inner = depth - 2; // the top-level object and meta's object
            format!(
                r#"{head},"meta":{{"a":{}{}}}}}"#,
                "[".repeat(inner),
                "]".repeat(inner)
            )
        };
        Manifest::decode(&enc(&nest(127))).unwrap();
        assert!(Manifest::decode(&enc(&nest(128))).is_err());
    }

    #[test]
    fn crc32_variant_matches_zlib() {
        // zlib.crc32(b"123456789") == 0xcbf43926, crc32c == 0xe3069283
        assert_eq!(Algo::Crc32.checksum(b"123456789"), 0xcbf4_3926);
        assert_eq!(Algo::Crc32c.checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn hashers_of_consecutive_pieces_combine_to_the_whole() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for algo in [Algo::Crc32, Algo::Crc32c] {
            for cuts in [
                vec![0, 100_003],
                vec![0, 1, 4096, 50_000, 100_003],
                vec![0, 0, 9, 9, 100_003],
            ] {
                let mut whole = algo.hasher();
                for w in cuts.windows(2) {
                    let mut h = algo.hasher();
                    h.update(&data[w[0]..w[1]]);
                    whole.combine(&h);
                }
                assert_eq!(whole.finish(), algo.checksum(&data), "{algo:?} {cuts:?}");
                let mut tail = algo.hasher();
                tail.update(&data[..10]);
                tail.combine(&whole); // and it keeps counting the length
                let mut more = algo.hasher();
                more.update(b"xyz");
                tail.combine(&more);
                let mut want = data[..10].to_vec();
                want.extend_from_slice(&data);
                want.extend_from_slice(b"xyz");
                assert_eq!(tail.finish(), algo.checksum(&want), "{algo:?} {cuts:?}");
            }
        }
    }

    /// Pieces of 512 MiB and more combine exactly too (the Python client's table wrapped at 32
    /// squarings, wrong for CRC-32C from 512 MiB on; this checks the crates' combine).
    #[test]
    fn pieces_of_512_mib_and_more_combine_exactly() {
        let zeros = vec![0u8; 8 << 20];
        for algo in [Algo::Crc32, Algo::Crc32c] {
            for n in [(1usize << 29) + 4097, (1 << 30) + 3] {
                let mut whole = algo.hasher();
                whole.update(b"head");
                let mut big = algo.hasher();
                let mut left = n;
                while left > 0 {
                    let k = left.min(zeros.len());
                    whole.update(&zeros[..k]);
                    big.update(&zeros[..k]);
                    left -= k;
                }
                let mut h = algo.hasher();
                h.update(b"head");
                h.combine(&big);
                assert_eq!(h.finish(), whole.finish(), "{algo:?} {n}");
            }
        }
    }
}
