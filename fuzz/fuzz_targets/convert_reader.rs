//! The whole streaming pipeline (detect, decompress, tar, format converter, sink, target) into
//! an in-memory target. Inputs whose probed virtual size exceeds the fuzz cap are skipped before
//! converting so the fuzzer does not allocate gigabytes; the target enforces the cap as well.
#![no_main]

use cdi_formats::convert::{ConvertOptions, convert_reader};
use cdi_fuzz::{FUZZ_MEMORY_BUDGET, MAX_FUZZ_DISK, VecTarget};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut probe_input = data;
    let Ok(info) = cdi_formats::info::probe_reader(&mut probe_input) else {
        return;
    };
    if info
        .format
        .virtual_size
        .is_some_and(|size| size > MAX_FUZZ_DISK)
    {
        return;
    }
    let opts = ConvertOptions {
        memory_budget: Some(FUZZ_MEMORY_BUDGET),
        ..Default::default()
    };
    let mut target = VecTarget::default();
    let mut input = data;
    if let Ok(report) = convert_reader(&mut input, &mut target, &opts) {
        assert!(
            target.finished,
            "conversion reported success without finishing the target"
        );
        assert_eq!(
            target.bytes.len() as u64,
            report.target_size,
            "target size vs report"
        );
        assert_eq!(
            report.scratch_bytes, 0,
            "scratch bytes counted without a scratch directory"
        );
    }
});
