//! vhdx random-access reader: open over a byte slice, walk the extents, read the data (bounded).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cdi_fuzz::open_and_walk(data, cdi_formats::vhdx::open);
});
