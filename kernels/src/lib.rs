//! streamrecon's CUDA kernels: the ops the models need that candle does not provide on the GPU,
//! or provides slowly (bilinear `grid_sample` in pixels, the 15×15 depthwise convolution,
//! VideoFlow's correlation lookup, attention over a K/V cache without the score matrix,
//! InfiniteVGGT's KV-cache pruning and compaction).
//!
//! The sources (`kernels/*.cu`) are compiled at run time through NVRTC, so a build needs no CUDA
//! toolkit and no GPU. The same sources are also built as C++ for the CPU ([`emulate`]): the
//! tests run them there against the Rust CPU versions in `streamrecon-models`, the CPU twins.
//! With the `cuda` feature, [`cuda::Gpu`] launches them on a device.

// Calls into the C++ emulation and, with `cuda`, kernel launches: both are FFI.
#![allow(unsafe_code)]

pub mod emulate;
mod shapes;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use shapes::{Attention, CorrLookup, Depthwise, GridSample, KvPrune};

/// One kernel source file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub file: &'static str,
    pub text: &'static str,
    pub kernels: &'static [&'static str],
}

/// Every kernel source, as NVRTC compiles it.
pub const SOURCES: &[Source] = &[
    Source {
        file: "grid_sample.cu",
        text: include_str!("../grid_sample.cu"),
        kernels: &["grid_sample_pixels_f32"],
    },
    Source {
        file: "depthwise.cu",
        text: include_str!("../depthwise.cu"),
        kernels: &["depthwise_conv2d_f32"],
    },
    Source {
        file: "corr_lookup.cu",
        text: include_str!("../corr_lookup.cu"),
        kernels: &["corr_lookup_f32"],
    },
    Source {
        file: "attention.cu",
        text: include_str!("../attention.cu"),
        kernels: &["attention_f32"],
    },
    Source {
        file: "kv_prune.cu",
        text: include_str!("../kv_prune.cu"),
        kernels: &[
            "kv_key_norms_f32",
            "kv_mean_key_f32",
            "kv_scores_f32",
            "kv_rank_keep_f32",
            "kv_keep_slots",
            "kv_compact_f32",
        ],
    },
];

/// Threads per block of every launch (one-dimensional grids).
pub const THREADS_PER_BLOCK: u32 = 256;

/// Blocks for `threads` threads of [`THREADS_PER_BLOCK`].
///
/// # Errors
/// More blocks than a grid's x dimension takes.
pub fn blocks_for(threads: usize) -> Result<u32> {
    u32::try_from(threads.div_ceil(THREADS_PER_BLOCK as usize))
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| Error::Shape(format!("{threads} threads do not fit one launch")))
}

/// What a CUDA device said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: usize,
    pub compute_capability: (i32, i32),
}

/// Opens CUDA device `ordinal` long enough to read what it is.
///
/// # Errors
/// [`Error::NotBuilt`] in a build without the `cuda` feature; otherwise no driver, no such device
/// or a driver error, each as its own variant.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    #[cfg(feature = "cuda")]
    {
        cuda::probe(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(Error::NotBuilt)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "CUDA: this build has no CUDA support (rebuild with `cargo build --release --features cuda`)"
    )]
    NotBuilt,
    #[error("CUDA: no NVIDIA driver on this machine (libcuda could not be loaded)")]
    NoDriver,
    #[error(
        "CUDA: NVRTC (libnvrtc.so.12) could not be loaded: install the CUDA runtime compiler, e.g. `pip install nvidia-cuda-nvrtc-cu12`, and put its lib folder on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("CUDA: no device {ordinal} (this machine has {count})")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("CUDA: NVRTC could not compile {file}: {log}")]
    Compile { file: &'static str, log: String },
    #[error("kernel shapes: {0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;
