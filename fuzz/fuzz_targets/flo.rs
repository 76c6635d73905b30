//! `.flo` reader: any bytes give a flow field or an error, never a panic or a huge allocation.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamrecon_datasets::formats::flo::flo_from_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(flow) = flo_from_bytes(data, Path::new("fuzz.flo")) {
        assert_eq!(flow.data.len(), 2 * flow.width * flow.height);
    }
});
