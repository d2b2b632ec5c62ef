//! `MANIFEST.ckpt` bytes from disk: decoding must never panic, and whatever it accepts must be
//! safe to act on (relative, bounded, unique names) and re-encode to a manifest that decodes
//! to the same value.
#![no_main]
use ckpt::store::manifest::{check_name, limits};
use ckpt::store::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert!(m.files.len() <= limits::FILES);
        for f in &m.files {
            assert!(check_name(&f.name).is_ok());
        }
        assert_eq!(Manifest::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
