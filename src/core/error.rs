//! The library's error type: each variant says what was wrong with the user's data, path last.

use std::path::PathBuf;

/// Errors of the streamrecon library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read or write: {source}: {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed file ({what}): {}", path.display())]
    Format { what: String, path: PathBuf },
    #[error("bad source ({what}): {input}")]
    Source { what: String, input: String },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("flow engine: {0}")]
    Flow(String),
    #[error("geometry engine: {0}")]
    Geometry(String),
    #[error("OpenCV: {0}")]
    OpenCv(String),
    #[error("rerun: {0}")]
    Rerun(String),
    #[error("model: {0}")]
    Model(String),
    /// A compute device that was asked for and cannot be used (the message names it: "CUDA: …").
    #[error("{0}")]
    Device(String),
}

#[cfg(feature = "opencv")]
impl From<opencv::Error> for Error {
    fn from(e: opencv::Error) -> Self {
        Self::OpenCv(e.to_string())
    }
}

#[cfg(feature = "candle")]
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e.to_string())
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Self::Format {
            what: what.into(),
            path: path.into(),
        }
    }

    pub fn source(input: impl Into<String>, what: impl Into<String>) -> Self {
        Self::Source {
            what: what.into(),
            input: input.into(),
        }
    }
}
