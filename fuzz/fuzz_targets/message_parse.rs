//! Datagrams from the job socket: parsing must never panic, whatever arrives.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ckpt::protocol::Message::parse(data);
});
