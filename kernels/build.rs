//! Builds the kernels' CPU emulation: every `.cu` file compiled as C++ with `emulate/emulate.h`
//! (the CUDA dialect the kernels use) included first, so the tests run the very sources NVRTC
//! compiles for the GPU.

use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = dir.join("emulate/emulate.h");
    let mut sources: Vec<_> = std::fs::read_dir(dir)
        .expect("the kernels folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(dir.join("emulate"))
        // Contracted multiply-adds would round differently from the Rust CPU versions.
        .flag("-ffp-contract=off")
        .flag("-Wno-unused-function")
        .file(dir.join("emulate/emulate.cpp"))
        // Everything after this is C++ whatever its extension.
        .flag("-include")
        .flag(header.to_str().expect("a UTF-8 path"))
        .flag("-xc++");
    for s in &sources {
        build.file(s);
        println!("cargo:rerun-if-changed={}", s.display());
    }
    // The folder itself, so that a new kernel file is picked up.
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed={}", header.display());
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("emulate/emulate.cpp").display()
    );
    build.compile("streamrecon_kernels_emulate");
}
