//! Frames as clients send them: PNG/JPEG bytes, or raw RGB with its size given alongside.
//! Every check happens before pixels are allocated, so a small upload cannot declare a huge
//! image (decompression bombs).

use std::io::Cursor;

use image::{ImageFormat, ImageReader, RgbImage};

use streamrecon_core::frame::check_frame_size;
use streamrecon_datasets::formats::rgb::decode_rgb;

/// Why a frame was refused; the message names what was wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

/// Decodes a PNG or JPEG frame; its declared size is checked against the limits and against
/// `session_size` (a session's frames keep its first frame's size) before anything is decoded.
///
/// # Errors
/// Not a PNG/JPEG, a header that cannot be read, a size out of bounds or not the session's, or
/// corrupt data.
pub fn decode_encoded(
    bytes: &[u8],
    session_size: Option<(u32, u32)>,
) -> Result<RgbImage, FrameError> {
    check_encoded_format(bytes)?;
    decode_rgb(bytes, |w, h| check_session_size((w, h), session_size)).map_err(FrameError)
}

/// What can be told of a frame without decoding it (its first bytes; a raw frame's length):
/// a NATS front door checks this before publishing, the worker decodes.
///
/// # Errors
/// Not a PNG/JPEG, or raw RGB of another length than its size needs.
pub fn check_undecoded(bytes: &[u8], raw: Option<(u32, u32)>) -> Result<(), FrameError> {
    match raw {
        None => check_encoded_format(bytes),
        Some((width, height)) => {
            check_frame_size(width, height).map_err(FrameError)?;
            check_raw_len(bytes.len(), width, height)
        }
    }
}

fn check_encoded_format(bytes: &[u8]) -> Result<(), FrameError> {
    let format = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FrameError(format!("cannot read the frame: {e}")))?
        .format();
    if !matches!(format, Some(ImageFormat::Png | ImageFormat::Jpeg)) {
        return Err(FrameError(
            "frame is not a PNG or JPEG image (raw RGB needs content-type image/x-raw-rgb)".into(),
        ));
    }
    Ok(())
}

fn check_raw_len(len: usize, width: u32, height: u32) -> Result<(), FrameError> {
    let want = u64::from(width) * u64::from(height) * 3;
    if len as u64 != want {
        return Err(FrameError(format!(
            "raw RGB frame of {width}x{height} needs {want} bytes, got {len}"
        )));
    }
    Ok(())
}

/// A frame's size against its session's.
///
/// # Errors
/// The sizes differ.
pub fn check_session_size(
    dims: (u32, u32),
    session_size: Option<(u32, u32)>,
) -> Result<(), String> {
    match session_size {
        Some(first) if first != dims => Err(format!(
            "frame is {}x{} but this session's frames are {}x{}",
            dims.0, dims.1, first.0, first.1
        )),
        _ => Ok(()),
    }
}

/// A raw frame: `width × height × 3` bytes, row-major RGB.
///
/// # Errors
/// A size out of bounds, or a body whose length is not exactly the declared size.
pub fn decode_raw(bytes: Vec<u8>, width: u32, height: u32) -> Result<RgbImage, FrameError> {
    check_frame_size(width, height).map_err(FrameError)?;
    check_raw_len(bytes.len(), width, height)?;
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
        let e = decode_encoded(&png_header_only(100_000, 100_000), None).unwrap_err();
        assert!(e.0.contains("100000x100000 is too large"), "{e}");
        let e = decode_encoded(&png_header_only(0, 0), None).unwrap_err();
        assert!(e.0.contains("frame"), "{e}");
        let e = decode_encoded(&png_header_only(8, 8), None).unwrap_err();
        assert!(e.0.contains("too small"), "{e}");
        // A plausible size with too little data is corrupt, not a panic.
        let e = decode_encoded(&png_header_only(64, 48), None).unwrap_err();
        assert!(e.0.contains("64x48 does not decode"), "{e}");
        assert!(decode_encoded(&png_header_only(16, 16), None).is_ok());
        assert!(decode_encoded(b"GIF89a....", None).is_err());
        // A session's size is checked from the header too: a small upload declaring a large
        // frame is refused before its pixels are allocated.
        let e = decode_encoded(&png_header_only(6000, 6000), Some((320, 240))).unwrap_err();
        assert!(
            e.0.contains("frame is 6000x6000 but this session's frames are 320x240"),
            "{e}"
        );
        assert!(decode_encoded(&png_header_only(16, 16), Some((16, 16))).is_ok());
        assert!(decode_encoded(b"", None).is_err());
    }

    #[test]
    fn raw_frames_must_match_their_size() {
        assert!(decode_raw(vec![7; 32 * 16 * 3], 32, 16).is_ok());
        let e = decode_raw(vec![7; 100], 32, 16).unwrap_err();
        assert!(e.0.contains("needs 1536 bytes, got 100"), "{e}");
        assert!(decode_raw(Vec::new(), 100_000, 100_000).is_err());
    }

    #[test]
    fn undecoded_checks_catch_what_the_bytes_alone_show() {
        assert!(check_undecoded(&png_header_only(16, 16), None).is_ok());
        let e = check_undecoded(b"not an image", None).unwrap_err();
        assert!(e.0.contains("PNG or JPEG"), "{e}");
        assert!(check_undecoded(&[7; 32 * 16 * 3], Some((32, 16))).is_ok());
        let e = check_undecoded(&[7; 100], Some((32, 16))).unwrap_err();
        assert!(e.0.contains("needs 1536 bytes, got 100"), "{e}");
        assert!(check_undecoded(&[], Some((100_000, 100_000))).is_err());
    }
}
