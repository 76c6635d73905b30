//! Dataset readers and writers and the synthetic world.

pub mod formats;
pub mod layouts;
pub mod native;
pub mod synth;
