//! A build without rerun (`--no-default-features`, e.g. the fuzz targets): asking for a
//! recording is a clear error; every other output works.

use super::{FrameLog, RerunTarget};
use streamrecon_core::error::{Error, Result};

/// Never made in this build (see [`open`]).
pub struct Viewer {
    _none: (),
}

/// `None` when no flag asked for a recording, else an error: this build has no rerun.
///
/// # Errors
/// Any rerun flag.
pub fn open(target: &RerunTarget, _application: &'static str) -> Result<Option<Viewer>> {
    if target.is_enabled() {
        return Err(Error::Rerun(
            "this build of streamrecon has no rerun support (built without the `rerun` feature)"
                .into(),
        ));
    }
    Ok(None)
}

impl Viewer {
    /// # Errors
    /// Never.
    pub fn log_frame(&mut self, _f: &FrameLog<'_>) -> Result<()> {
        Ok(())
    }

    /// # Errors
    /// Never.
    pub fn log_scalar(&self, _path: &str, _value: f64) -> Result<()> {
        Ok(())
    }

    /// # Errors
    /// Never.
    pub fn log_corrected_trajectory(&self, _centres: &[[f32; 3]]) -> Result<()> {
        Ok(())
    }

    /// # Errors
    /// Never.
    pub fn log_map(
        &self,
        _points: &[[f32; 3]],
        _colors: &[[u8; 3]],
        _normals: Option<&[[f32; 3]]>,
    ) -> Result<()> {
        Ok(())
    }

    /// # Errors
    /// Never.
    pub fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// # Errors
    /// Never.
    pub fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
