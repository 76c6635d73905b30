//! PNG/JPEG frames decoded with their declared size checked first, so a small file cannot
//! declare a huge image (a decompression bomb): every source and the service read frames here.

use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::Path;

use image::{ImageReader, Limits, RgbImage};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{check_frame_size, MAX_FRAME_PIXELS, MAX_FRAME_SIDE};

/// Decodes `make()`'s image after reading only its header: a size out of bounds, or one `check`
/// refuses, is refused before any pixel is allocated. `make` opens the data afresh (the header
/// read consumes it).
fn decode_checked<R: BufRead + Seek>(
    make: impl Fn() -> std::io::Result<ImageReader<R>>,
    check: impl FnOnce(u32, u32) -> std::result::Result<(), String>,
) -> std::result::Result<RgbImage, String> {
    let open = || {
        make()
            .and_then(ImageReader::with_guessed_format)
            .map_err(|e| format!("cannot read the frame: {e}"))
    };
    let (w, h) = open()?
        .into_dimensions()
        .map_err(|e| format!("frame header is not readable: {e}"))?;
    check_frame_size(w, h)?;
    check(w, h)?;
    let mut reader = open()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_FRAME_SIDE);
    limits.max_image_height = Some(MAX_FRAME_SIDE);
    // RGBA at 16 bits per channel is the widest a PNG decodes to.
    limits.max_alloc = Some(MAX_FRAME_PIXELS * 8);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| format!("frame of {w}x{h} does not decode: {e}"))?;
    Ok(image.into_rgb8())
}

/// Decodes an image held in memory (any format the `image` build reads: PNG and JPEG);
/// `check` sees the declared size first and may refuse it.
///
/// # Errors
/// A header that cannot be read, a size out of bounds or refused, or corrupt data, in words.
pub fn decode_rgb(
    bytes: &[u8],
    check: impl FnOnce(u32, u32) -> std::result::Result<(), String>,
) -> std::result::Result<RgbImage, String> {
    decode_checked(|| Ok(ImageReader::new(Cursor::new(bytes))), check)
}

/// Reads an image file.
///
/// # Errors
/// [`Error::Format`] naming the file: unreadable, a size out of bounds, or corrupt data.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    decode_checked(
        || Ok(ImageReader::new(BufReader::new(std::fs::File::open(path)?))),
        |_, _| Ok(()),
    )
    .map_err(|what| Error::format(path, what))
}
