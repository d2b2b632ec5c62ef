//! Extracts the README's Rust recipe (the first ```rust block under "### Rust") into
//! OUT_DIR/readme_rust.rs, compiled as written by the `readme_rust` helper job: the recipe a
//! user copies is the one the tests run.
fn main() {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    println!("cargo:rerun-if-changed={}", readme.display());
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let section = text
        .split("\n### Rust\n")
        .nth(1)
        .expect("README.md has a \"### Rust\" section");
    let start = section.find("```rust\n").expect("a ```rust block") + "```rust\n".len();
    let end = start + section[start..].find("```").expect("the block's end");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("readme_rust.rs");
    std::fs::write(out, &section[start..end]).unwrap();
}
