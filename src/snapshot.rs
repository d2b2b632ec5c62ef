//! The in-memory snapshot behind asynchronous saves ([`crate::Checkpointer::save_async`]).
//!
//! A snapshot is a set of named byte buffers. Filling it copies the job's state into
//! buffers that are kept between saves, so from the second save on the copy runs at memcpy
//! speed into memory that is already touched (the first save pays the page faults of a fresh
//! allocation, about 7x slower here: `docs/benchmarks.md`). Persisting the snapshot, the
//! fsyncs and the publish then run on a background thread while the job goes on.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::pod::{le_chunks, Pod};
use crate::store::manifest::check_name;
use crate::store::Stage;

/// Named buffers copied from the job's state. Reused from one save to the next.
#[derive(Default)]
pub struct Snapshot {
    /// The pool: the first `used` entries belong to the snapshot being filled.
    files: Vec<(String, Vec<u8>)>,
    used: usize,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("files", &self.names().collect::<Vec<_>>())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Snapshot {
        Snapshot::default()
    }

    /// Forgets the files (keeps the buffers for reuse).
    pub(crate) fn clear(&mut self) {
        self.used = 0;
    }

    /// The names of the files in the snapshot.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files[..self.used].iter().map(|(n, _)| n.as_str())
    }

    /// Total bytes in the snapshot.
    pub fn bytes(&self) -> u64 {
        self.files[..self.used]
            .iter()
            .map(|(_, b)| b.len() as u64)
            .sum()
    }

    /// Bytes held by the buffer pool (the memory the snapshot keeps between saves).
    pub fn capacity(&self) -> u64 {
        self.files.iter().map(|(_, b)| b.capacity() as u64).sum()
    }

    /// The buffer for `name` (old contents still in it): the one `name` used last time if
    /// any (so its memory is already touched), else a spare one.
    fn slot(&mut self, name: &str) -> Result<&mut Vec<u8>> {
        check_name(name).map_err(Error::Name)?;
        if self.files[..self.used].iter().any(|(n, _)| n == name) {
            return Err(Error::Usage(format!(
                "snapshot already has a file {name:?}; hint: each file name once per save"
            )));
        }
        let i = match self.files[self.used..].iter().position(|(n, _)| n == name) {
            Some(j) => self.used + j,
            None if self.used < self.files.len() => {
                // A spare buffer: the largest, to avoid growing a small one.
                let j = (self.used..self.files.len())
                    .max_by_key(|&k| self.files[k].1.capacity())
                    .unwrap_or(self.used);
                self.files[j].0 = name.to_string();
                j
            }
            None => {
                self.files.push((name.to_string(), Vec::new()));
                self.files.len() - 1
            }
        };
        self.files.swap(self.used, i);
        self.used += 1;
        Ok(&mut self.files[self.used - 1].1)
    }

    /// Copies `data` in as file `name`.
    pub fn put(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let buf = self.slot(name)?;
        buf.clear();
        buf.extend_from_slice(data);
        Ok(())
    }

    /// Copies a numeric array in as file `name` (little-endian bytes, like
    /// [`Stage::write_pod`]).
    pub fn put_pod<T: Pod>(&mut self, name: &str, data: &[T]) -> Result<()> {
        let buf = self.slot(name)?;
        buf.clear();
        buf.reserve(std::mem::size_of_val(data));
        le_chunks(data, |c| {
            buf.extend_from_slice(c);
            Ok(())
        })
        .map_err(|e| Error::io("copy", name, e))
    }

    /// Encodes `value` with postcard as file `name` (what [`crate::Checkpointer::restore`]
    /// reads back when `name` is [`crate::client::STATE_FILE`]).
    pub fn put_serde<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        let mut buf = std::mem::take(self.slot(name)?);
        buf.clear();
        let buf = postcard::to_extend(value, buf).map_err(|e| Error::Codec {
            action: "encode",
            path: name.into(),
            detail: e.to_string(),
        })?;
        self.files[self.used - 1].1 = buf;
        Ok(())
    }

    /// A writable buffer of `len` bytes for file `name`, for state that is copied in by the
    /// job itself (zero-filled only the first time a buffer grows).
    pub fn buffer(&mut self, name: &str, len: usize) -> Result<&mut [u8]> {
        let buf = self.slot(name)?;
        buf.resize(len, 0);
        Ok(&mut buf[..])
    }

    /// Writes every file into `stage` through the streaming path.
    pub(crate) fn write_to(&self, stage: &mut Stage) -> Result<()> {
        for (name, buf) in &self.files[..self.used] {
            stage.write_large(name, buf)?;
        }
        Ok(())
    }
}
