//! TUM trajectories: `timestamp tx ty tz qx qy qz qw` per line (world_from_cam), `#` comments.

use std::fmt::Write as _;
use std::path::Path;

use nalgebra::{Quaternion, Translation3, UnitQuaternion};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Pose;
use streamrecon_core::io_util::{read_file, write_atomic};

/// One stamped pose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StampedPose {
    pub timestamp: f64,
    pub world_from_cam: Pose,
}

/// Parses TUM text; `path` names the input in errors.
///
/// # Errors
/// A line with the wrong number of fields, a non-number, or a zero quaternion.
pub fn tum_from_str(text: &str, path: &Path) -> Result<Vec<StampedPose>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let vals: Vec<f64> = line
            .split_whitespace()
            .map(str::parse::<f64>)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::format(path, format!("line {}: {e}", n + 1)))?;
        if vals.len() != 8 || vals.iter().any(|v| !v.is_finite()) {
            return Err(Error::format(
                path,
                format!("line {}: need 8 finite numbers", n + 1),
            ));
        }
        let q = Quaternion::new(vals[7], vals[4], vals[5], vals[6]);
        if q.norm() < 1e-9 {
            return Err(Error::format(
                path,
                format!("line {}: zero quaternion", n + 1),
            ));
        }
        out.push(StampedPose {
            timestamp: vals[0],
            world_from_cam: Pose::from_parts(
                Translation3::new(vals[1], vals[2], vals[3]),
                UnitQuaternion::from_quaternion(q),
            ),
        });
    }
    Ok(out)
}

/// Reads a TUM trajectory file.
///
/// # Errors
/// See [`tum_from_str`], plus I/O and UTF-8 errors.
pub fn read_tum(path: &Path) -> Result<Vec<StampedPose>> {
    let bytes = read_file(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| Error::format(path, "not UTF-8 text"))?;
    tum_from_str(text, path)
}

/// Formats poses as TUM text.
pub fn tum_to_string(poses: &[StampedPose]) -> String {
    let mut s = String::with_capacity(poses.len() * 96);
    for p in poses {
        let t = p.world_from_cam.translation.vector;
        let q = p.world_from_cam.rotation.coords; // (x, y, z, w)
        let _ = writeln!(
            s,
            "{:.6} {:.9} {:.9} {:.9} {:.9} {:.9} {:.9} {:.9}",
            p.timestamp, t.x, t.y, t.z, q.x, q.y, q.z, q.w
        );
    }
    s
}

/// Writes a TUM trajectory atomically.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_tum(path: &Path, poses: &[StampedPose]) -> Result<()> {
    let s = tum_to_string(poses);
    write_atomic(path, |w| w.write_all(s.as_bytes()))
}

/// Formats poses as a KITTI odometry file: the top 3×4 of world_from_cam, row-major, per line.
pub fn kitti_poses_to_string(poses: &[StampedPose]) -> String {
    let mut s = String::with_capacity(poses.len() * 160);
    for p in poses {
        let m = p.world_from_cam.to_homogeneous();
        let row: Vec<String> = (0..3)
            .flat_map(|r| (0..4).map(move |c| (r, c)))
            .map(|(r, c)| format!("{:.9e}", m[(r, c)]))
            .collect();
        let _ = writeln!(s, "{}", row.join(" "));
    }
    s
}
