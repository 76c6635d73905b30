//! `utils/pose_enc.py::pose_encoding_to_extri_intri` for `absT_quaR_FoV`.

use nalgebra::{Quaternion, UnitQuaternion, Vector3};

use streamrecon_core::frame::{Intrinsics, Pose};

/// Camera from world `[R | t]` (3×4, row-major) exactly as the reference builds it: the
/// quaternion (XYZW) is used unnormalised through `2 / |q|²`.
pub fn extrinsic_from_pose_enc(enc: &[f32]) -> [[f32; 4]; 3] {
    let (i, j, k, r) = (enc[3], enc[4], enc[5], enc[6]);
    let two_s = 2.0 / (i * i + j * j + k * k + r * r);
    let m = [
        [
            1.0 - two_s * (j * j + k * k),
            two_s * (i * j - k * r),
            two_s * (i * k + j * r),
        ],
        [
            two_s * (i * j + k * r),
            1.0 - two_s * (i * i + k * k),
            two_s * (j * k - i * r),
        ],
        [
            two_s * (i * k - j * r),
            two_s * (j * k + i * r),
            1.0 - two_s * (i * i + j * j),
        ],
    ];
    let mut out = [[0f32; 4]; 3];
    for row in 0..3 {
        out[row][..3].copy_from_slice(&m[row]);
        out[row][3] = enc[row];
    }
    out
}

/// Pinhole intrinsics of an `h × w` image from the encoded FoVs (principal point at the centre).
pub fn intrinsics_from_pose_enc(enc: &[f32], h: usize, w: usize) -> Intrinsics {
    let fy = (h as f32 / 2.0) / (enc[7] / 2.0).tan();
    let fx = (w as f32 / 2.0) / (enc[8] / 2.0).tan();
    Intrinsics {
        fx: f64::from(fx),
        fy: f64::from(fy),
        cx: w as f64 / 2.0,
        cy: h as f64 / 2.0,
        width: w as u32,
        height: h as u32,
    }
}

/// `cam_from_world` as a rigid transform (the quaternion normalised).
pub fn cam_from_world(enc: &[f32]) -> Pose {
    let q = Quaternion::new(
        f64::from(enc[6]),
        f64::from(enc[3]),
        f64::from(enc[4]),
        f64::from(enc[5]),
    );
    let rot = if q.norm() > 0.0 {
        UnitQuaternion::from_quaternion(q)
    } else {
        UnitQuaternion::identity()
    };
    let t = Vector3::new(f64::from(enc[0]), f64::from(enc[1]), f64::from(enc[2]));
    Pose::from_parts(t.into(), rot)
}
