//! Learned models in candle: module trees mirror the PyTorch ones and read the official
//! checkpoints by key name, with no conversion step.

pub mod attention;
pub mod bench;
pub mod gemm;
pub mod ops;
pub mod parity;
pub mod vggt;
pub mod videoflow;
pub mod weights;
