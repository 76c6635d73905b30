//! streamrecon: a stream of video frames in; optical flow, camera poses, depth and a growing,
//! bounded 3D point cloud out, frame by frame, shown live in rerun.
//!
//! Stages (see `ARCHITECTURE.md`): [`source`] → [`flow`] → [`geometry`] → [`fusion`] →
//! [`sinks`] + [`viewer`], run by [`pipeline`]. [`datasets`] holds the file formats, dataset
//! layouts and the synthetic world; [`eval`] the metrics.

pub mod cloud;
#[path = "../datasets/mod.rs"]
pub mod datasets;
pub mod error;
pub mod eval;
pub mod flow;
pub mod frame;
pub mod fusion;
pub mod geometry;
pub mod io_util;
pub mod models;
pub mod pipeline;
pub mod serve;
pub mod simd;
pub mod sinks;
pub mod source;
pub mod stats;
#[path = "../viewer/mod.rs"]
pub mod viewer;

pub use error::{Error, Result};
