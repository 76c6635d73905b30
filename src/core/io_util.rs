//! Atomic file writes: write to a temporary name beside the target, then rename.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes a file through `fill`; the file appears under `path` only once complete.
///
/// # Errors
/// Any I/O error, naming `path`.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    write_atomic_with(path, |tmp| File::create(tmp), fill)
}

/// The atomic write behind [`write_atomic`] and [`write_secret`]: `open` makes the temporary file.
fn write_atomic_with(
    path: &Path,
    open: impl FnOnce(&Path) -> std::io::Result<File>,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_name(path);
    let result = (|| {
        let file = open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?;
        file.sync_data()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes bytes atomically.
///
/// # Errors
/// Any I/O error, naming `path`.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// Reads a whole file, naming it on failure.
///
/// # Errors
/// Any I/O error, naming `path`.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Creates a directory (and parents), naming it on failure.
///
/// # Errors
/// Any I/O error, naming `dir`.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Writes a secret (a token) readable by its owner only (mode 0600 from the start), atomically.
///
/// # Errors
/// Any I/O error, naming `path`.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    write_atomic_with(
        path,
        |tmp| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
        },
        |w| w.write_all(bytes),
    )
}
