//! Shared bits of the helper jobs.

/// Reads `--name value` from the arguments.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Reads a numeric argument with a default.
pub fn num(name: &str, default: u64) -> u64 {
    arg(name)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} wants a number, got {v}"))
        })
        .unwrap_or(default)
}

/// `n` incompressible f32s from a xorshift32 stream (the same stream as `ckpt bench`'s state),
/// never NaN or infinite (the exponent's top bit is cleared).
pub fn incompressible_f32s(n: usize) -> Vec<f32> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(x & 0xbfff_ffff)
        })
        .collect()
}
