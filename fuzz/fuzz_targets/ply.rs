//! PLY reader (ascii, binary little/big endian): any bytes give a cloud or an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamrecon_datasets::formats::ply::ply_from_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(cloud) = ply_from_bytes(data, Path::new("fuzz.ply")) {
        assert!(cloud.len() <= data.len());
    }
});
