//! Middlebury `.flo`: float magic 202021.25, i32 width, i32 height, then interleaved (u, v) f32, little endian.

use std::path::Path;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::io_util::{read_file, write_atomic};

pub const FLO_MAGIC: f32 = 202_021.25;
/// Larger fields are rejected as malformed rather than allocated.
const MAX_PIXELS: usize = 1 << 28;

/// Parses `.flo` bytes; `path` only names the input in errors.
///
/// # Errors
/// Wrong magic, bad dimensions, truncated or oversized data, non-finite values.
pub fn flo_from_bytes(bytes: &[u8], path: &Path) -> Result<FlowField> {
    if bytes.len() < 12 {
        return Err(Error::format(path, "truncated .flo header"));
    }
    let word = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
    let magic = f32::from_le_bytes(word(0));
    if magic.to_bits() != FLO_MAGIC.to_bits() {
        return Err(Error::format(path, format!("wrong .flo magic {magic}")));
    }
    let w = i32::from_le_bytes(word(4));
    let h = i32::from_le_bytes(word(8));
    if w <= 0 || h <= 0 || (w as usize).saturating_mul(h as usize) > MAX_PIXELS {
        return Err(Error::format(
            path,
            format!(".flo size {w}x{h} out of range"),
        ));
    }
    let (w, h) = (w as usize, h as usize);
    let expect = 12 + w * h * 8;
    if bytes.len() != expect {
        return Err(Error::format(
            path,
            format!(
                ".flo of {w}x{h} needs {expect} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let mut data = Vec::with_capacity(w * h * 2);
    for c in bytes[12..].chunks_exact(4) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if !v.is_finite() {
            return Err(Error::format(path, "non-finite value in .flo"));
        }
        data.push(v);
    }
    Ok(FlowField {
        width: w,
        height: h,
        data,
    })
}

/// Reads a `.flo` file.
///
/// # Errors
/// See [`flo_from_bytes`], plus I/O errors.
pub fn read_flo(path: &Path) -> Result<FlowField> {
    flo_from_bytes(&read_file(path)?, path)
}

/// Serialises a flow field as `.flo` bytes.
pub fn flo_to_bytes(flow: &FlowField) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + flow.data.len() * 4);
    out.extend_from_slice(&FLO_MAGIC.to_le_bytes());
    out.extend_from_slice(&(flow.width as i32).to_le_bytes());
    out.extend_from_slice(&(flow.height as i32).to_le_bytes());
    for v in &flow.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a `.flo` file atomically.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_flo(path: &Path, flow: &FlowField) -> Result<()> {
    let bytes = flo_to_bytes(flow);
    write_atomic(path, |w| w.write_all(&bytes))
}
