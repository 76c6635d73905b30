//! Camera trajectories for the synthetic world, evaluated per frame index with random access
//! (control points are hashed from the seed, so any length costs no memory).

use nalgebra::{Matrix3, Rotation3, Translation3, UnitQuaternion, Vector3};

use streamrecon_core::frame::Pose;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum TrajectoryKind {
    /// Catmull-Rom spline through random positions, the heading drifting round the scene with a
    /// random wobble, the pitch wandering between looking down and level (no whip-pans).
    Smooth,
    /// Smooth plus high-frequency jitter.
    Handheld,
    /// Smooth with abrupt viewpoint changes every `JUMP_EVERY` frames.
    Jumpy,
    /// Smooth segments alternating with near-still segments.
    Static,
    /// Fixed position, rotating.
    Rotation,
    /// Closed loops around the scene, period `LOOP_FRAMES`.
    Loop,
    /// A kidnapped camera: blocks of `REVISIT_BLOCK` frames along the smooth path, each
    /// starting `REVISIT_BLOCK − REVISIT_STEP` frames back along it, so after every jump the
    /// camera sees again what it saw before, then goes on to new ground.
    Revisit,
}

/// Frames between spline control points.
pub const FRAMES_PER_CONTROL: f64 = 60.0;
/// A jump every this many frames in `jumpy`.
pub const JUMP_EVERY: usize = 60;
/// Control intervals skipped at a jump.
const JUMP_SKIP: f64 = 7.37;
/// Length of moving / still segments in `static`.
pub const STATIC_SEGMENT: usize = 40;
/// Frames per loop in `loop`.
pub const LOOP_FRAMES: usize = 300;
/// Frames per block in `revisit`, and how far along the path each block starts after the
/// previous one's start.
pub const REVISIT_BLOCK: usize = 150;
pub const REVISIT_STEP: usize = 50;
/// Heading drift per control interval (radians; its sign is drawn per seed) and the random
/// wobble on each control's heading: at most ≈ 2° of turn per frame.
const YAW_DRIFT: f64 = 0.6;
const YAW_WOBBLE: f64 = 0.7;
/// Pitch range of the controls (radians; negative looks down).
const PITCH_MIN: f64 = -0.55;
const PITCH_MAX: f64 = 0.1;

/// A trajectory in a free box of the scene, world y up, cameras in OpenCV axes.
#[derive(Debug, Clone)]
pub struct Trajectory {
    pub kind: TrajectoryKind,
    seed: u64,
    free_min: Vector3<f64>,
    free_max: Vector3<f64>,
}

fn unit_hash(i: i64, k: u64, seed: u64) -> f64 {
    let mut h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ k.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ seed.wrapping_mul(0x1656_67b1_9e37_79f9);
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn catmull_rom(
    p0: Vector3<f64>,
    p1: Vector3<f64>,
    p2: Vector3<f64>,
    p3: Vector3<f64>,
    t: f64,
) -> Vector3<f64> {
    let t2 = t * t;
    let t3 = t2 * t;
    (p1 * 2.0
        + (p2 - p0) * t
        + (p0 * 2.0 - p1 * 5.0 + p2 * 4.0 - p3) * t2
        + (p1 * 3.0 - p0 - p2 * 3.0 + p3) * t3)
        * 0.5
}

/// world_from_cam looking from `eye` at `target`, world y up, camera x right, y down, z forward.
pub fn look_at(eye: &Vector3<f64>, target: &Vector3<f64>) -> Pose {
    let forward = (target - eye).normalize();
    let up = Vector3::y();
    let mut right = forward.cross(&up);
    if right.norm() < 1e-6 {
        right = Vector3::x();
    }
    let right = right.normalize();
    let down = forward.cross(&right);
    let r = Rotation3::from_matrix_unchecked(Matrix3::from_columns(&[right, down, forward]));
    Pose::from_parts(
        Translation3::from(*eye),
        UnitQuaternion::from_rotation_matrix(&r),
    )
}

impl Trajectory {
    pub fn new(
        kind: TrajectoryKind,
        seed: u64,
        free_min: Vector3<f32>,
        free_max: Vector3<f32>,
    ) -> Self {
        Self {
            kind,
            seed,
            free_min: free_min.cast(),
            free_max: free_max.cast(),
        }
    }

    fn control(&self, i: i64, stream: u64, scale: f64) -> Vector3<f64> {
        let c = (self.free_min + self.free_max) * 0.5;
        let h = (self.free_max - self.free_min) * 0.5;
        Vector3::new(
            c.x + h.x * scale * (2.0 * unit_hash(i, stream, self.seed) - 1.0),
            c.y + h.y * (2.0 * unit_hash(i, stream + 1, self.seed) - 1.0),
            c.z + h.z * scale * (2.0 * unit_hash(i, stream + 2, self.seed) - 1.0),
        )
    }

    fn spline(&self, s: f64, stream: u64, scale: f64) -> Vector3<f64> {
        let i = s.floor() as i64;
        let t = s - s.floor();
        catmull_rom(
            self.control(i - 1, stream, scale),
            self.control(i, stream, scale),
            self.control(i + 1, stream, scale),
            self.control(i + 2, stream, scale),
            t,
        )
    }

    fn smooth_at(&self, s: f64) -> Pose {
        let eye = self.spline(s, 0, 1.0);
        // The view direction from heading/pitch splines, not by looking at a second random
        // path: that target passed close to the eye every few hundred frames, and the camera
        // whipped round by 20–150° in a frame (or, within 0.5 m, jumped to a fixed direction).
        let spin = if unit_hash(0, 30, self.seed) < 0.5 {
            -YAW_DRIFT
        } else {
            YAW_DRIFT
        };
        let yaw0 = std::f64::consts::TAU * unit_hash(0, 31, self.seed);
        let angles = |k: i64| {
            Vector3::new(
                yaw0 + spin * k as f64 + YAW_WOBBLE * (2.0 * unit_hash(k, 32, self.seed) - 1.0),
                PITCH_MIN + (PITCH_MAX - PITCH_MIN) * unit_hash(k, 33, self.seed),
                0.0,
            )
        };
        let i = s.floor() as i64;
        let a = catmull_rom(
            angles(i - 1),
            angles(i),
            angles(i + 1),
            angles(i + 2),
            s - s.floor(),
        );
        let (yaw, pitch) = (a.x, a.y.clamp(PITCH_MIN, PITCH_MAX));
        let forward = Vector3::new(
            pitch.cos() * yaw.sin(),
            pitch.sin(),
            pitch.cos() * yaw.cos(),
        );
        look_at(&eye, &(eye + forward))
    }

    /// Frames at which `jumpy` and `revisit` change viewpoint abruptly (frame k is the first
    /// after a jump).
    pub fn jump_frames(&self, frames: usize) -> Vec<usize> {
        let every = match self.kind {
            TrajectoryKind::Jumpy => JUMP_EVERY,
            TrajectoryKind::Revisit => REVISIT_BLOCK,
            _ => return Vec::new(),
        };
        (1..=frames / every)
            .map(|k| k * every)
            .filter(|&f| f < frames)
            .collect()
    }

    /// Camera pose for frame `i`.
    pub fn world_from_cam(&self, i: usize) -> Pose {
        let fi = i as f64;
        let s = fi / FRAMES_PER_CONTROL;
        match self.kind {
            TrajectoryKind::Smooth => self.smooth_at(s),
            TrajectoryKind::Handheld => {
                let base = self.smooth_at(s);
                // Shake at a few Hz (30 fps), a few millimetres and a fraction of a degree.
                let ph = |k: u64| std::f64::consts::TAU * unit_hash(0, 100 + k, self.seed);
                let w = |f: f64, k: u64| (std::f64::consts::TAU * f * fi / 30.0 + ph(k)).sin();
                let dt = Vector3::new(
                    0.004 * (w(3.1, 0) + 0.5 * w(7.3, 1)),
                    0.004 * (w(2.7, 2) + 0.5 * w(6.1, 3)),
                    0.003 * (w(3.7, 4) + 0.5 * w(8.9, 5)),
                );
                let dr = Vector3::new(
                    0.006 * (w(2.3, 6) + 0.5 * w(5.9, 7)),
                    0.006 * (w(3.3, 8) + 0.5 * w(7.7, 9)),
                    0.004 * (w(4.1, 10) + 0.5 * w(9.7, 11)),
                );
                let jitter =
                    Pose::from_parts(Translation3::from(dt), UnitQuaternion::from_scaled_axis(dr));
                base * jitter
            }
            TrajectoryKind::Jumpy => {
                let jumps = (i / JUMP_EVERY) as f64;
                self.smooth_at(s + jumps * JUMP_SKIP)
            }
            TrajectoryKind::Revisit => {
                let along = (i / REVISIT_BLOCK) * REVISIT_STEP + i % REVISIT_BLOCK;
                self.smooth_at(along as f64 / FRAMES_PER_CONTROL)
            }
            TrajectoryKind::Static => {
                let seg = i / STATIC_SEGMENT;
                let moving_frames = (seg / 2) * STATIC_SEGMENT
                    + if seg.is_multiple_of(2) {
                        i % STATIC_SEGMENT
                    } else {
                        STATIC_SEGMENT
                    };
                let base = self.smooth_at(moving_frames as f64 / FRAMES_PER_CONTROL);
                if seg.is_multiple_of(2) {
                    base
                } else {
                    // Near-identical frames: sub-millimetre tremor.
                    let e = 0.0002 * (2.0 * unit_hash(i as i64, 200, self.seed) - 1.0);
                    base * Pose::translation(e, -e, e)
                }
            }
            TrajectoryKind::Rotation => {
                let c = (self.free_min + self.free_max) * 0.5;
                let yaw = 1.1 * (std::f64::consts::TAU * fi / 400.0).sin();
                let pitch = 0.2 * (std::f64::consts::TAU * fi / 170.0).sin();
                let dir = Vector3::new(
                    yaw.sin() * pitch.cos(),
                    pitch.sin(),
                    yaw.cos() * pitch.cos(),
                );
                look_at(&c, &(c + dir))
            }
            TrajectoryKind::Loop => {
                let c = (self.free_min + self.free_max) * 0.5;
                let h = (self.free_max - self.free_min) * 0.45;
                let a = std::f64::consts::TAU * fi / LOOP_FRAMES as f64;
                let eye = Vector3::new(
                    c.x + h.x * a.cos(),
                    c.y + 0.3 * h.y * (2.0 * a).sin(),
                    c.z + h.z * a.sin(),
                );
                // Look outwards and ahead, so the walls pass by.
                let ahead = Vector3::new(-a.sin(), 0.0, a.cos());
                let out = Vector3::new(a.cos(), 0.0, a.sin());
                look_at(&eye, &(eye + out * 1.0 + ahead * 0.6))
            }
        }
    }
}
