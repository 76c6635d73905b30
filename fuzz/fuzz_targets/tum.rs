//! TUM trajectory reader: any text gives poses or an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamrecon_datasets::formats::tum::tum_from_str;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(poses) = tum_from_str(text, Path::new("fuzz.txt")) {
            for p in &poses {
                let pose = &p.world_from_cam;
                assert!(pose.translation.vector.iter().all(|v| v.is_finite()));
                assert!(pose.rotation.coords.iter().all(|v| v.is_finite()));
            }
        }
    }
});
