//! Learned models in candle: module trees mirror the PyTorch ones and read the official
//! checkpoints by key name, with no conversion step.

pub mod attention;
pub mod bench;
pub mod gemm;
pub mod ops;
pub mod parity;
pub mod streamflow;
pub mod vggt;
pub mod videoflow;
pub mod weights;

/// Keeps candle's elementwise ops on the calling thread; call at the start of `main`, before any
/// tensor exists (candle reads the variable once), unless `CANDLE_NUM_THREADS` is set.
///
/// candle splits large elementwise ops over a thread pool of its own whose workers spin between
/// ops; beside rayon's pool, which the matrix products, convolutions and attention here use,
/// they take cycles from that work on a machine with few cores (vggt small, 2 cores: 4.6 ->
/// 5.3–5.6 frames/s, alternated runs).
pub fn init_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
