//! Frames as clients send them: PNG/JPEG bytes, or raw RGB with its size given alongside.
//! Every check happens before pixels are allocated, so a small upload cannot declare a huge
//! image (decompression bombs).

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits, RgbImage};

/// Largest accepted side of a frame, pixels.
pub const MAX_SIDE: u32 = 8192;
/// Largest accepted frame area, pixels (a 8K UHD frame is 33.2 M).
pub const MAX_PIXELS: u64 = 40_000_000;
/// Smallest accepted side (the flow pyramid needs a few levels).
pub const MIN_SIDE: u32 = 16;

/// Why a frame was refused; the message names what was wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

fn check_size(width: u32, height: u32) -> Result<(), FrameError> {
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err(FrameError(format!(
            "frame of {width}x{height} is too small ({MIN_SIDE}x{MIN_SIDE} at least)"
        )));
    }
    if width > MAX_SIDE || height > MAX_SIDE || u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(FrameError(format!(
            "frame of {width}x{height} is too large (at most {MAX_SIDE} a side and {MAX_PIXELS} pixels)"
        )));
    }
    Ok(())
}

/// Decodes a PNG or JPEG frame; its declared size is checked before anything is decoded.
///
/// # Errors
/// Not a PNG/JPEG, a header that cannot be read, a size out of bounds, or corrupt data.
pub fn decode_encoded(bytes: &[u8]) -> Result<RgbImage, FrameError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FrameError(format!("cannot read the frame: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        _ => {
            return Err(FrameError(
                "frame is not a PNG or JPEG image (raw RGB needs content-type image/x-raw-rgb)"
                    .into(),
            ))
        }
    }
    let (w, h) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FrameError(format!("cannot read the frame: {e}")))?
        .into_dimensions()
        .map_err(|e| FrameError(format!("frame header is not readable: {e}")))?;
    check_size(w, h)?;
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // RGBA at 16 bits per channel is the widest a PNG decodes to.
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| FrameError(format!("frame of {w}x{h} does not decode: {e}")))?;
    Ok(image.into_rgb8())
}

/// A raw frame: `width × height × 3` bytes, row-major RGB.
///
/// # Errors
/// A size out of bounds, or a body whose length is not exactly the declared size.
pub fn decode_raw(bytes: Vec<u8>, width: u32, height: u32) -> Result<RgbImage, FrameError> {
    check_size(width, height)?;
    let want = u64::from(width) * u64::from(height) * 3;
    if bytes.len() as u64 != want {
        return Err(FrameError(format!(
            "raw RGB frame of {width}x{height} needs {want} bytes, got {}",
            bytes.len()
        )));
    }
    RgbImage::from_raw(width, height, bytes)
        .ok_or_else(|| FrameError(format!("raw RGB frame of {width}x{height} is malformed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real 16×16 PNG whose header is rewritten to declare `w × h` (a decompression-bomb shape:
    /// valid chunks, a size far beyond its data).
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        let mut png = Vec::new();
        image::RgbImage::new(16, 16)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        // IHDR data sits at bytes 16..29, its CRC (over type and data) at 29..33.
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let mut crc = 0xFFFF_FFFFu32;
        for &b in &png[12..29] {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    0xEDB8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
        png[29..33].copy_from_slice(&(!crc).to_be_bytes());
        png
    }

    #[test]
    fn declared_sizes_are_checked_before_decoding() {
        let e = decode_encoded(&png_header_only(100_000, 100_000)).unwrap_err();
        assert!(e.0.contains("100000x100000 is too large"), "{e}");
        let e = decode_encoded(&png_header_only(0, 0)).unwrap_err();
        assert!(e.0.contains("frame"), "{e}");
        let e = decode_encoded(&png_header_only(8, 8)).unwrap_err();
        assert!(e.0.contains("too small"), "{e}");
        // A plausible size with too little data is corrupt, not a panic.
        let e = decode_encoded(&png_header_only(64, 48)).unwrap_err();
        assert!(e.0.contains("64x48 does not decode"), "{e}");
        assert!(decode_encoded(&png_header_only(16, 16)).is_ok());
        assert!(decode_encoded(b"GIF89a....").is_err());
        assert!(decode_encoded(b"").is_err());
    }

    #[test]
    fn raw_frames_must_match_their_size() {
        assert!(decode_raw(vec![7; 32 * 16 * 3], 32, 16).is_ok());
        let e = decode_raw(vec![7; 100], 32, 16).unwrap_err();
        assert!(e.0.contains("needs 1536 bytes, got 100"), "{e}");
        assert!(decode_raw(Vec::new(), 100_000, 100_000).is_err());
    }
}
