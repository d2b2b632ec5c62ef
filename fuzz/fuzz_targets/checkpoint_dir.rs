//! A whole checkpoint from disk: the input is split into a manifest and one file's bytes,
//! written into a scratch checkpoint directory, and verified. Verification must never panic
//! nor read outside the directory, whatever the manifest claims.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (manifest, rest) = data.split_at(split);
    let dir = std::env::temp_dir().join(format!("ckpt-fuzz-{}", std::process::id()));
    let ck = dir.join("ckpt-000000000001");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("MANIFEST.ckpt"), manifest).unwrap();
    std::fs::write(ck.join("state"), rest).unwrap();
    let _ = ckpt::store::scan::verify_path(&ck, Some(1));
});
