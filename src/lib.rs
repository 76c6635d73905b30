//! streamrecon: a stream of video frames in; optical flow, camera poses, depth and a growing,
//! bounded 3D point cloud out, frame by frame, shown live in rerun.
//!
//! This crate is the command line (`src/main.rs`, `src/cli.rs`); as a library it only re-exports
//! the layer crates under one name, as rerun's top crate does (see `ARCHITECTURE.md`):
//! [`source`] → [`flow`] → [`geometry`] → [`fusion`] → [`sinks`] + [`viewer`], run by
//! [`pipeline`]; [`datasets`] holds the file formats, dataset layouts and the synthetic world,
//! [`models`] the candle ports, [`eval`] the metrics and [`serve`] the network service.

pub use streamrecon_core::{cloud, error, frame, io_util, simd, stats, Error, Result};
pub use streamrecon_datasets as datasets;
pub use streamrecon_eval as eval;
pub use streamrecon_flow as flow;
pub use streamrecon_geometry as geometry;
pub use streamrecon_models as models;
pub use streamrecon_pipeline::{self as pipeline, fusion, sinks, source};
pub use streamrecon_serve as serve;
pub use streamrecon_viewer as viewer;
