//! PLY point clouds: writes binary little endian `x y z red green blue confidence [nx ny nz]`;
//! reads ascii and binary (little/big endian) vertex elements with float/double/int/uchar properties.

use std::path::Path;

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::io_util::{read_file, write_atomic};

/// Writes a binary PLY atomically (colour grey and confidence 1 where the cloud has none).
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_ply(path: &Path, cloud: &PointCloud) -> Result<()> {
    let bytes = ply_to_bytes(cloud);
    write_atomic(path, |w| w.write_all(&bytes))
}

/// Serialises a cloud as binary little-endian PLY.
pub fn ply_to_bytes(cloud: &PointCloud) -> Vec<u8> {
    let n = cloud.points.len();
    let mut header = format!(
        "ply\nformat binary_little_endian 1.0\ncomment streamrecon\nelement vertex {n}\n\
         property float x\nproperty float y\nproperty float z\n\
         property uchar red\nproperty uchar green\nproperty uchar blue\nproperty float confidence\n"
    );
    if cloud.normals.is_some() {
        header.push_str("property float nx\nproperty float ny\nproperty float nz\n");
    }
    header.push_str("end_header\n");
    let mut out = Vec::with_capacity(header.len() + n * 31);
    out.extend_from_slice(header.as_bytes());
    for i in 0..n {
        for v in cloud.points[i] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let c = cloud.colors.as_ref().map_or([128, 128, 128], |c| c[i]);
        out.extend_from_slice(&c);
        let conf = cloud.confidence.as_ref().map_or(1.0, |c| c[i]);
        out.extend_from_slice(&conf.to_le_bytes());
        if let Some(nrm) = &cloud.normals {
            for v in nrm[i] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Ascii,
    Le,
    Be,
}

#[derive(Clone, Copy)]
enum Scalar {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Scalar {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "char" | "int8" => Self::I8,
            "uchar" | "uint8" => Self::U8,
            "short" | "int16" => Self::I16,
            "ushort" | "uint16" => Self::U16,
            "int" | "int32" => Self::I32,
            "uint" | "uint32" => Self::U32,
            "float" | "float32" => Self::F32,
            "double" | "float64" => Self::F64,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::I8 | Self::U8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }
    fn read(self, b: &[u8], enc: Encoding) -> f64 {
        macro_rules! rd {
            ($t:ty, $n:expr) => {{
                let mut a = [0u8; $n];
                a.copy_from_slice(&b[..$n]);
                if enc == Encoding::Be {
                    <$t>::from_be_bytes(a) as f64
                } else {
                    <$t>::from_le_bytes(a) as f64
                }
            }};
        }
        match self {
            Self::I8 => f64::from(b[0] as i8),
            Self::U8 => f64::from(b[0]),
            Self::I16 => rd!(i16, 2),
            Self::U16 => rd!(u16, 2),
            Self::I32 => rd!(i32, 4),
            Self::U32 => rd!(u32, 4),
            Self::F32 => rd!(f32, 4),
            Self::F64 => rd!(f64, 8),
        }
    }
}

struct Element {
    name: String,
    count: usize,
    props: Vec<(String, Scalar)>,
}

/// Parses PLY bytes; `path` names the input in errors.
///
/// # Errors
/// A malformed header, list properties in the vertex element, missing x/y/z, or truncated data.
pub fn ply_from_bytes(bytes: &[u8], path: &Path) -> Result<PointCloud> {
    let bad = |w: &str| Error::format(path, format!("PLY: {w}"));
    let end = find_subslice(bytes, b"end_header\n").ok_or_else(|| bad("no end_header"))?;
    let header = std::str::from_utf8(&bytes[..end]).map_err(|_| bad("header is not text"))?;
    let mut lines = header.lines();
    if lines.next().map(str::trim) != Some("ply") {
        return Err(bad("missing 'ply' magic"));
    }
    let mut enc = None;
    let mut elements: Vec<Element> = Vec::new();
    for line in lines {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["format", f, _] => {
                enc = Some(match *f {
                    "ascii" => Encoding::Ascii,
                    "binary_little_endian" => Encoding::Le,
                    "binary_big_endian" => Encoding::Be,
                    _ => return Err(bad("unknown format")),
                });
            }
            ["element", name, count] => elements.push(Element {
                name: (*name).to_string(),
                count: count.parse().map_err(|_| bad("bad element count"))?,
                props: Vec::new(),
            }),
            ["property", "list", ..] => {
                let el = elements
                    .last()
                    .ok_or_else(|| bad("property before element"))?;
                if el.name == "vertex" {
                    return Err(bad("list property in vertex element"));
                }
                // Only elements after the vertices may hold lists; they are never read.
                let el = elements
                    .last_mut()
                    .ok_or_else(|| bad("property before element"))?;
                el.props.push(("list".into(), Scalar::U8));
            }
            ["property", ty, name] => {
                let s = Scalar::parse(ty).ok_or_else(|| bad("unknown property type"))?;
                elements
                    .last_mut()
                    .ok_or_else(|| bad("property before element"))?
                    .props
                    .push(((*name).to_string(), s));
            }
            [] | ["comment" | "obj_info", ..] => {}
            _ => return Err(bad("unexpected header line")),
        }
    }
    let enc = enc.ok_or_else(|| bad("no format line"))?;
    let first = elements.first().ok_or_else(|| bad("no elements"))?;
    if first.name != "vertex" {
        return Err(bad("first element must be vertex"));
    }
    let idx = |n: &str| first.props.iter().position(|(p, _)| p == n);
    let (Some(ix), Some(iy), Some(iz)) = (idx("x"), idx("y"), idx("z")) else {
        return Err(bad("vertex lacks x/y/z"));
    };
    let rgb = match (idx("red"), idx("green"), idx("blue")) {
        (Some(r), Some(g), Some(b)) => Some([r, g, b]),
        _ => None,
    };
    let nrm = match (idx("nx"), idx("ny"), idx("nz")) {
        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
        _ => None,
    };
    let iconf = idx("confidence");
    let n = first.count;
    let nprops = first.props.len();
    let body = &bytes[end + "end_header\n".len()..];
    // The header's count is only trusted as far as the body can hold that many vertices.
    let max_rows = if enc == Encoding::Ascii {
        body.len() / 2 + 1
    } else {
        body.len()
    };
    if n > max_rows {
        return Err(bad("vertex count exceeds the data"));
    }
    let mut rows: Vec<f64> = Vec::with_capacity(n * nprops);
    if enc == Encoding::Ascii {
        let text = std::str::from_utf8(body).map_err(|_| bad("ascii body is not text"))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        for _ in 0..n {
            let line = lines.next().ok_or_else(|| bad("truncated ascii body"))?;
            let vals: Vec<f64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| bad("bad number"))?;
            if vals.len() < nprops {
                return Err(bad("short vertex line"));
            }
            rows.extend_from_slice(&vals[..nprops]);
        }
    } else {
        let stride: usize = first.props.iter().map(|(_, s)| s.size()).sum();
        let need = n
            .checked_mul(stride)
            .ok_or_else(|| bad("vertex count overflows"))?;
        if body.len() < need {
            return Err(bad("truncated binary body"));
        }
        for r in 0..n {
            let mut off = r * stride;
            for (_, s) in &first.props {
                rows.push(s.read(&body[off..], enc));
                off += s.size();
            }
        }
    }
    let get = |r: usize, c: usize| rows[r * nprops + c];
    let points = (0..n)
        .map(|r| [get(r, ix) as f32, get(r, iy) as f32, get(r, iz) as f32])
        .collect();
    let colors = rgb.map(|c| {
        (0..n)
            .map(|r| [get(r, c[0]) as u8, get(r, c[1]) as u8, get(r, c[2]) as u8])
            .collect()
    });
    let confidence = iconf.map(|c| (0..n).map(|r| get(r, c) as f32).collect());
    let normals = nrm.map(|c| {
        (0..n)
            .map(|r| {
                [
                    get(r, c[0]) as f32,
                    get(r, c[1]) as f32,
                    get(r, c[2]) as f32,
                ]
            })
            .collect()
    });
    let cloud = PointCloud {
        points,
        colors,
        confidence,
        normals,
    };
    Ok(cloud)
}

/// Reads a PLY file.
///
/// # Errors
/// See [`ply_from_bytes`], plus I/O errors.
pub fn read_ply(path: &Path) -> Result<PointCloud> {
    ply_from_bytes(&read_file(path)?, path)
}

pub(crate) fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
