//! Dataset readers and writers and the synthetic world.

pub mod formats;
pub mod native;
pub mod synth;
