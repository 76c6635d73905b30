//! The sinks: file exports of a run (rerun logging lives in `viewer/`).

pub mod files;
