//! PCD reader (ascii, binary, binary_compressed): any bytes give a cloud or an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamrecon_datasets::formats::pcd::pcd_from_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(cloud) = pcd_from_bytes(data, Path::new("fuzz.pcd")) {
        // A cloud can never hold more points than the bytes could describe.
        assert!(cloud.len() <= data.len());
    }
});
