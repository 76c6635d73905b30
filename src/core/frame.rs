//! The one `Frame` type every source produces and every stage reads.

use nalgebra::{Isometry3, Matrix3};
use serde::{Deserialize, Serialize};

use crate::flow_field::FlowField;

/// RGB u8 image, row-major HWC.
pub type RgbImage = image::RgbImage;

/// A rigid camera pose, named by the frames it maps between (`world_from_cam`, `cam_from_world`).
pub type Pose = Isometry3<f64>;

/// Pinhole intrinsics in pixels; pixel centres sit at integer coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Intrinsics {
    pub fx: f64,
    pub fy: f64,
    pub cx: f64,
    pub cy: f64,
    pub width: u32,
    pub height: u32,
}

/// A pose as `[tx, ty, tz, qx, qy, qz, qw]` (TUM's order), for files and snapshots.
pub fn pose_to_array(p: &Pose) -> [f64; 7] {
    let (t, q) = (p.translation.vector, p.rotation.coords);
    [t.x, t.y, t.z, q.x, q.y, q.z, q.w]
}

/// The pose of [`pose_to_array`]'s layout (the quaternion normalised); `None` unless every
/// value is finite and the quaternion is not zero.
pub fn pose_from_array(a: [f64; 7]) -> Option<Pose> {
    let [x, y, z, qx, qy, qz, qw] = a;
    let q = nalgebra::Quaternion::new(qw, qx, qy, qz);
    (a.iter().all(|v| v.is_finite()) && q.norm() > 1e-12).then(|| {
        Pose::from_parts(
            nalgebra::Translation3::new(x, y, z),
            nalgebra::UnitQuaternion::from_quaternion(q),
        )
    })
}

/// Largest side of a frame any source or upload may have, pixels.
pub const MAX_FRAME_SIDE: u32 = 8192;
/// Largest frame area, pixels (an 8K UHD frame is 33.2 M).
pub const MAX_FRAME_PIXELS: u64 = 40_000_000;
/// Smallest side (the flow pyramid needs a few levels).
pub const MIN_FRAME_SIDE: u32 = 16;

/// Whether a frame of `width × height` is within the limits every input is held to.
///
/// # Errors
/// The reason in words, naming the size.
pub fn check_frame_size(width: u32, height: u32) -> std::result::Result<(), String> {
    if width < MIN_FRAME_SIDE || height < MIN_FRAME_SIDE {
        return Err(format!(
            "frame of {width}x{height} is too small ({MIN_FRAME_SIDE}x{MIN_FRAME_SIDE} at least)"
        ));
    }
    if width > MAX_FRAME_SIDE
        || height > MAX_FRAME_SIDE
        || u64::from(width) * u64::from(height) > MAX_FRAME_PIXELS
    {
        return Err(format!(
            "frame of {width}x{height} is too large (at most {MAX_FRAME_SIDE} a side and {MAX_FRAME_PIXELS} pixels)"
        ));
    }
    Ok(())
}

/// Horizontal field of view assumed when nothing better is known.
pub const DEFAULT_HFOV_DEG: f64 = 60.0;

impl Intrinsics {
    /// Intrinsics with a given horizontal field of view, principal point at the image centre.
    pub fn from_hfov(width: u32, height: u32, hfov_deg: f64) -> Self {
        let fx = 0.5 * f64::from(width) / (0.5 * hfov_deg.to_radians()).tan();
        Self {
            fx,
            fy: fx,
            cx: (f64::from(width) - 1.0) * 0.5,
            cy: (f64::from(height) - 1.0) * 0.5,
            width,
            height,
        }
    }

    /// The same camera seen at another resolution (pixel centres at integer coordinates).
    pub fn scaled_to(&self, width: u32, height: u32) -> Self {
        let sx = f64::from(width) / f64::from(self.width);
        let sy = f64::from(height) / f64::from(self.height);
        Self {
            fx: self.fx * sx,
            fy: self.fy * sy,
            cx: (self.cx + 0.5) * sx - 0.5,
            cy: (self.cy + 0.5) * sy - 0.5,
            width,
            height,
        }
    }

    pub fn matrix(&self) -> Matrix3<f64> {
        Matrix3::new(self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0)
    }

    /// Pixel → camera point at depth `z` (OpenCV axes).
    #[inline]
    pub fn unproject(&self, u: f64, v: f64, z: f64) -> nalgebra::Point3<f64> {
        nalgebra::Point3::new((u - self.cx) / self.fx * z, (v - self.cy) / self.fy * z, z)
    }

    /// Camera point → pixel; `None` behind the camera.
    #[inline]
    pub fn project(&self, p: &nalgebra::Point3<f64>) -> Option<(f64, f64)> {
        (p.z > 1e-9).then(|| (self.fx * p.x / p.z + self.cx, self.fy * p.y / p.z + self.cy))
    }
}

/// Ground truth that dataset sources carry along with a frame.
#[derive(Debug, Clone, Default)]
pub struct GroundTruth {
    pub world_from_cam: Option<Pose>,
    /// Depth in metres, row-major, 0 = no surface.
    pub depth: Option<Vec<f32>>,
    /// Flow from this frame to the next.
    pub flow_fwd: Option<FlowField>,
}

/// One frame of a stream.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Position in the output stream (0, 1, 2, … after stride/start).
    pub index: u64,
    /// Position in the underlying source (file frame number, dataset frame).
    pub source_index: u64,
    /// Seconds since the start of the stream.
    pub timestamp: f64,
    pub image: RgbImage,
    pub intrinsics: Option<Intrinsics>,
    pub gt: Option<GroundTruth>,
}

impl Frame {
    pub fn width(&self) -> u32 {
        self.image.width()
    }
    pub fn height(&self) -> u32 {
        self.image.height()
    }
}
