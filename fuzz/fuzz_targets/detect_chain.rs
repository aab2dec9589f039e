//! Detection chain over arbitrary bytes: magic sniffing, decompression layers, tar, headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    if let Ok(info) = cdi_formats::info::probe_reader(&mut input) {
        assert!(
            info.compression.len() <= cdi_formats::limits::MAX_COMPRESSION_LAYERS,
            "more compression layers than the limit: {:?}",
            info.compression
        );
        if let Some(size) = info.format.virtual_size {
            assert!(
                size <= cdi_formats::limits::MAX_VIRTUAL_SIZE,
                "virtual size {size} over the limit"
            );
        }
    }
});
