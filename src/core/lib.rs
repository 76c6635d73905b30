//! streamrecon's bottom layer: the plain types every stage shares — frames, intrinsics and
//! poses, flow fields, point clouds —, the library's error, atomic file writes, run-time
//! vectorised loops and process statistics. No stage, model or viewer code.

pub mod cloud;
pub mod error;
pub mod flow_field;
pub mod frame;
pub mod io_util;
pub mod simd;
pub mod stats;

pub use error::{Error, Result};
