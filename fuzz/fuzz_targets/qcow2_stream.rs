//! qcow2 one-pass stream converter into a counting sink, without scratch space.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cdi_fuzz::stream_into_counter(data, cdi_formats::qcow2::stream);
});
