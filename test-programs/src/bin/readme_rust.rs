//! The README's Rust recipe, compiled as written (extracted by build.rs).
include!(concat!(env!("OUT_DIR"), "/readme_rust.rs"));
