//! PCD (PCL) point clouds: reads `ascii`, `binary` and `binary_compressed` (LZF, column-major);
//! writes ascii and binary with fields `x y z` and, when present, packed `rgb`.

use std::fmt::Write as _;
use std::path::Path;

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::io_util::{read_file, write_atomic};

/// Largest point count accepted, so a lying header cannot make us allocate without bound.
const MAX_POINTS: usize = 1 << 28;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PcdData {
    Ascii,
    Binary,
    BinaryCompressed,
}

#[derive(Clone, Copy)]
struct Field {
    size: usize,
    kind: u8,
    count: usize,
}

impl Field {
    fn read(self, b: &[u8]) -> f64 {
        match (self.kind, self.size) {
            (b'F', 4) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (b'F', 8) => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            (b'U', 1) => f64::from(b[0]),
            (b'I', 1) => f64::from(b[0] as i8),
            (b'U', 2) => f64::from(u16::from_le_bytes([b[0], b[1]])),
            (b'I', 2) => f64::from(i16::from_le_bytes([b[0], b[1]])),
            (b'U', 4) => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (b'I', 4) => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => f64::NAN,
        }
    }
    /// Packed colour word as stored (float or uint bits).
    fn rgb_bits(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Parses PCD bytes; `path` names the input in errors.
///
/// # Errors
/// A malformed header, unsupported field type, truncated or corrupt (LZF) data.
pub fn pcd_from_bytes(bytes: &[u8], path: &Path) -> Result<PointCloud> {
    let bad = |w: &str| Error::format(path, format!("PCD: {w}"));
    let mut pos = 0;
    let mut names: Vec<String> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    let mut kinds: Vec<u8> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    let mut width = None;
    let mut height = 1usize;
    let mut points = None;
    let data;
    loop {
        let nl = bytes[pos..]
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| bad("header ends before DATA"))?;
        let line =
            std::str::from_utf8(&bytes[pos..pos + nl]).map_err(|_| bad("header is not text"))?;
        pos += nl + 1;
        let t: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| s.parse::<usize>().map_err(|_| bad("bad number in header"));
        let key = t.first().copied();
        if key.is_none_or(|k| k.starts_with('#') || k == "VERSION" || k == "VIEWPOINT") {
            continue;
        }
        match key {
            Some("FIELDS") => names = t[1..].iter().map(|s| (*s).to_string()).collect(),
            Some("SIZE") => sizes = t[1..].iter().map(|s| num(s)).collect::<Result<_>>()?,
            Some("TYPE") => kinds = t[1..].iter().map(|s| s.as_bytes()[0]).collect(),
            Some("COUNT") => counts = t[1..].iter().map(|s| num(s)).collect::<Result<_>>()?,
            Some("WIDTH") => width = Some(num(t.get(1).ok_or_else(|| bad("WIDTH"))?)?),
            Some("HEIGHT") => height = num(t.get(1).ok_or_else(|| bad("HEIGHT"))?)?,
            Some("POINTS") => points = Some(num(t.get(1).ok_or_else(|| bad("POINTS"))?)?),
            Some("DATA") => {
                data = match t.get(1).copied() {
                    Some("ascii") => PcdData::Ascii,
                    Some("binary") => PcdData::Binary,
                    Some("binary_compressed") => PcdData::BinaryCompressed,
                    _ => return Err(bad("unknown DATA kind")),
                };
                break;
            }
            _ => return Err(bad("unexpected header line")),
        }
    }
    if counts.is_empty() {
        counts = vec![1; names.len()];
    }
    if names.is_empty()
        || sizes.len() != names.len()
        || kinds.len() != names.len()
        || counts.len() != names.len()
    {
        return Err(bad("FIELDS/SIZE/TYPE/COUNT disagree"));
    }
    let n = match (points, width) {
        (Some(p), _) => p,
        (None, Some(w)) => w.checked_mul(height).ok_or_else(|| bad("size overflows"))?,
        _ => return Err(bad("no POINTS or WIDTH")),
    };
    if n > MAX_POINTS {
        return Err(bad("too many points"));
    }
    let fields: Vec<Field> = (0..names.len())
        .map(|i| Field {
            size: sizes[i],
            kind: kinds[i],
            count: counts[i],
        })
        .collect();
    for f in &fields {
        if !matches!((f.kind, f.size), (b'F', 4 | 8) | (b'U' | b'I', 1 | 2 | 4)) || f.count == 0 {
            return Err(bad("unsupported field type"));
        }
    }
    let col = |name: &str| names.iter().position(|n| n == name);
    let (Some(ix), Some(iy), Some(iz)) = (col("x"), col("y"), col("z")) else {
        return Err(bad("no x/y/z fields"));
    };
    let irgb = col("rgb").or_else(|| col("rgba"));
    // A packed colour is a 4-byte word (found by cargo-fuzz: SIZE 1 read past the field).
    if irgb.is_some_and(|c| fields[c].size != 4) {
        return Err(bad("the rgb/rgba field must have SIZE 4"));
    }
    let body = &bytes[pos..];
    // The header's count is only trusted as far as the body can hold that many points.
    let stride: usize = fields.iter().map(|f| f.size * f.count).sum();
    let max_points = match data {
        PcdData::Ascii => body.len() / 2 + 1,
        PcdData::Binary => body.len() / stride.max(1),
        // LZF expands at most ~100×.
        PcdData::BinaryCompressed => body.len().saturating_mul(128) / stride.max(1) + 1,
    };
    if n > max_points {
        return Err(bad("point count exceeds the data"));
    }
    let mut xyz = vec![[0f32; 3]; n];
    let mut colors = irgb.map(|_| vec![[0u8; 3]; n]);
    let unpack = |bits: u32| {
        [
            ((bits >> 16) & 255) as u8,
            ((bits >> 8) & 255) as u8,
            (bits & 255) as u8,
        ]
    };
    match data {
        PcdData::Ascii => {
            let text = std::str::from_utf8(body).map_err(|_| bad("ascii body is not text"))?;
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            // Column index of each field's first value in a row.
            let starts: Vec<usize> = fields
                .iter()
                .scan(0, |acc, f| {
                    let s = *acc;
                    *acc += f.count;
                    Some(s)
                })
                .collect();
            for (r, p) in xyz.iter_mut().enumerate() {
                let line = lines.next().ok_or_else(|| bad("truncated ascii body"))?;
                let vals: Vec<&str> = line.split_whitespace().collect();
                let getf = |c: usize| -> Result<f64> {
                    vals.get(starts[c])
                        .ok_or_else(|| bad("short row"))?
                        .parse::<f64>()
                        .map_err(|_| bad("bad number"))
                };
                *p = [getf(ix)? as f32, getf(iy)? as f32, getf(iz)? as f32];
                if let (Some(c), Some(cols)) = (irgb, colors.as_mut()) {
                    let v = getf(c)?;
                    let bits = if fields[c].kind == b'F' {
                        (v as f32).to_bits()
                    } else {
                        v as u32
                    };
                    cols[r] = unpack(bits);
                }
            }
        }
        PcdData::Binary => {
            let stride: usize = fields.iter().map(|f| f.size * f.count).sum();
            let offs: Vec<usize> = fields
                .iter()
                .scan(0, |acc, f| {
                    let s = *acc;
                    *acc += f.size * f.count;
                    Some(s)
                })
                .collect();
            if body.len() < n * stride {
                return Err(bad("truncated binary body"));
            }
            for (r, p) in xyz.iter_mut().enumerate() {
                let row = &body[r * stride..];
                *p = [
                    fields[ix].read(&row[offs[ix]..]) as f32,
                    fields[iy].read(&row[offs[iy]..]) as f32,
                    fields[iz].read(&row[offs[iz]..]) as f32,
                ];
                if let (Some(c), Some(cols)) = (irgb, colors.as_mut()) {
                    cols[r] = unpack(Field::rgb_bits(&row[offs[c]..]));
                }
            }
        }
        PcdData::BinaryCompressed => {
            if body.len() < 8 {
                return Err(bad("truncated compressed header"));
            }
            let csize = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
            let usize_ = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
            let stride: usize = fields.iter().map(|f| f.size * f.count).sum();
            if usize_ != n * stride {
                return Err(bad("uncompressed size disagrees with the header"));
            }
            let comp = body
                .get(8..8 + csize)
                .ok_or_else(|| bad("truncated compressed body"))?;
            let raw = lzf_decompress(comp, usize_).ok_or_else(|| bad("corrupt LZF data"))?;
            // Column-major: each field's values for all points, one field after another.
            let mut starts = Vec::with_capacity(fields.len());
            let mut acc = 0;
            for f in &fields {
                starts.push(acc);
                acc += f.size * f.count * n;
            }
            for (r, p) in xyz.iter_mut().enumerate() {
                let at = |c: usize| &raw[starts[c] + r * fields[c].size * fields[c].count..];
                *p = [
                    fields[ix].read(at(ix)) as f32,
                    fields[iy].read(at(iy)) as f32,
                    fields[iz].read(at(iz)) as f32,
                ];
                if let (Some(c), Some(cols)) = (irgb, colors.as_mut()) {
                    cols[r] = unpack(Field::rgb_bits(at(c)));
                }
            }
        }
    }
    // PCL writes NaN for invalid points of organised clouds; drop them.
    let keep: Vec<usize> = (0..n)
        .filter(|&i| xyz[i].iter().all(|v| v.is_finite()))
        .collect();
    let cloud = PointCloud {
        points: xyz,
        colors,
        confidence: None,
        normals: None,
    };
    Ok(if keep.len() == n {
        cloud
    } else {
        cloud.retain_indices(&keep)
    })
}

/// Reads a PCD file.
///
/// # Errors
/// See [`pcd_from_bytes`], plus I/O errors.
pub fn read_pcd(path: &Path) -> Result<PointCloud> {
    pcd_from_bytes(&read_file(path)?, path)
}

/// Serialises a cloud as PCD (`x y z` float, plus packed `rgb` when the cloud has colours).
pub fn pcd_to_bytes(cloud: &PointCloud, data: PcdData) -> Vec<u8> {
    let n = cloud.points.len();
    let has_rgb = cloud.colors.is_some();
    let mut h = String::from("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n");
    if has_rgb {
        h.push_str("FIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 1\n");
    } else {
        h.push_str("FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n");
    }
    let kind = match data {
        PcdData::Ascii => "ascii",
        PcdData::Binary => "binary",
        PcdData::BinaryCompressed => "binary_compressed",
    };
    let _ = write!(
        h,
        "WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {kind}\n"
    );
    let mut out = h.into_bytes();
    let rgb = |i: usize| {
        cloud.colors.as_ref().map_or(0u32, |c| {
            (u32::from(c[i][0]) << 16) | (u32::from(c[i][1]) << 8) | u32::from(c[i][2])
        })
    };
    match data {
        PcdData::Ascii => {
            let mut s = String::new();
            for (i, p) in cloud.points.iter().enumerate() {
                let _ = write!(s, "{} {} {}", p[0], p[1], p[2]);
                if has_rgb {
                    let _ = write!(s, " {}", rgb(i));
                }
                s.push('\n');
            }
            out.extend_from_slice(s.as_bytes());
        }
        PcdData::Binary => {
            for (i, p) in cloud.points.iter().enumerate() {
                for v in p {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                if has_rgb {
                    out.extend_from_slice(&rgb(i).to_le_bytes());
                }
            }
        }
        PcdData::BinaryCompressed => {
            let mut raw = Vec::with_capacity(n * 16);
            for axis in 0..3 {
                for p in &cloud.points {
                    raw.extend_from_slice(&p[axis].to_le_bytes());
                }
            }
            if has_rgb {
                for i in 0..n {
                    raw.extend_from_slice(&rgb(i).to_le_bytes());
                }
            }
            let comp = lzf_compress_literal(&raw);
            out.extend_from_slice(&(comp.len() as u32).to_le_bytes());
            out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            out.extend_from_slice(&comp);
        }
    }
    out
}

/// Writes a PCD file atomically.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_pcd(path: &Path, cloud: &PointCloud, data: PcdData) -> Result<()> {
    let bytes = pcd_to_bytes(cloud, data);
    write_atomic(path, |w| w.write_all(&bytes))
}

/// LZF decompression (liblzf format, as PCL uses it). Hand-written: the only crate for it is
/// deprecated, and the format is a few lines. `None` on corrupt input or size mismatch.
pub fn lzf_decompress(input: &[u8], out_len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(out_len);
    let mut i = 0;
    while i < input.len() {
        let ctrl = input[i] as usize;
        i += 1;
        if ctrl < 32 {
            let len = ctrl + 1;
            let lit = input.get(i..i + len)?;
            if out.len() + len > out_len {
                return None;
            }
            out.extend_from_slice(lit);
            i += len;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += *input.get(i)? as usize;
                i += 1;
            }
            len += 2;
            let back = ((ctrl & 0x1f) << 8) + *input.get(i)? as usize + 1;
            i += 1;
            if back > out.len() || out.len() + len > out_len {
                return None;
            }
            let start = out.len() - back;
            for k in 0..len {
                out.push(out[start + k]);
            }
        }
    }
    (out.len() == out_len).then_some(out)
}

/// LZF "compression" with literal runs only: valid LZF any reader accepts, no size gain.
fn lzf_compress_literal(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 32 + 1);
    for chunk in input.chunks(32) {
        out.push((chunk.len() - 1) as u8);
        out.extend_from_slice(chunk);
    }
    out
}
