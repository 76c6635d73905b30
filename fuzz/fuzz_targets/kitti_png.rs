//! KITTI 16-bit PNG flow reader: any bytes give a flow with its valid mask, or an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamrecon_datasets::formats::kitti_flow::kitti_flow_from_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = kitti_flow_from_bytes(data, Path::new("fuzz.png")) {
        assert_eq!(k.valid.len(), k.flow.width * k.flow.height);
    }
});
