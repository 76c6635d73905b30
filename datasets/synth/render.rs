//! Ray-cast rendering with exact ground truth: RGB (edge-supersampled), depth, object ids, and
//! optical flow / occlusion between two rendered frames.

use nalgebra::{Point3, Vector3};
use rayon::prelude::*;

use super::scene::{Scene, TileBins};

/// Pixels per side of a binning tile.
const TILE: usize = 16;
use crate::flow::FlowField;
use crate::frame::{Intrinsics, Pose};

/// Object id of pixels that see no surface.
pub const NO_OBJECT: u16 = u16::MAX;
/// Sub-samples per side for pixels on object edges.
const EDGE_SUPERSAMPLE: usize = 3;
/// Relative depth tolerance of the occlusion test.
const OCCLUSION_DEPTH_TOL: f64 = 0.03;

/// One rendered view with its ground truth.
pub struct RenderedFrame {
    pub world_from_cam: Pose,
    /// Linear RGB in [0, 1], row-major HWC, before any degradation.
    pub rgb: Vec<[f32; 3]>,
    /// Camera z in metres, 0 = no surface.
    pub depth: Vec<f32>,
    pub object: Vec<u16>,
}

struct Camera {
    origin: Vector3<f32>,
    rot: nalgebra::Matrix3<f32>,
    intr: Intrinsics,
}

impl Camera {
    #[inline]
    fn ray(&self, x: f32, y: f32) -> Vector3<f32> {
        let dc = Vector3::new(
            (x - self.intr.cx as f32) / self.intr.fx as f32,
            (y - self.intr.cy as f32) / self.intr.fy as f32,
            1.0,
        );
        self.rot * dc
    }
}

#[inline]
fn radiance(scene: &Scene, cam: &Camera, bins: &TileBins, x: f32, y: f32) -> ([f32; 3], f32, u16) {
    let d = cam.ray(x, y);
    // Samples lie at ≥ −1/3 px: round = floor(x + 0.5), and the cast saturates below 0 (no libm
    // call on the baseline x86-64 target).
    let (px, py) = ((x + 0.5) as usize, (y + 0.5) as usize);
    let px = px.min(cam.intr.width as usize - 1);
    let py = py.min(cam.intr.height as usize - 1);
    let candidates = bins.at(px, py).iter().map(|&i| i as usize);
    match scene.intersect_among(&cam.origin, &d, 1e-4, candidates) {
        Some(hit) => {
            let dn = d.norm();
            let cos = (hit.normal.dot(&d) / dn).abs().max(0.2);
            let footprint = hit.t * dn / cam.intr.fx as f32 / cos;
            (scene.shade(&hit, footprint), hit.t, hit.object)
        }
        None => (Scene::sky(&d), 0.0, NO_OBJECT),
    }
}

/// Renders the scene from `world_from_cam`.
pub fn render(scene: &Scene, intr: &Intrinsics, world_from_cam: &Pose) -> RenderedFrame {
    let (w, h) = (intr.width as usize, intr.height as usize);
    let cam = Camera {
        origin: world_from_cam.translation.vector.cast(),
        rot: world_from_cam.rotation.to_rotation_matrix().matrix().cast(),
        intr: *intr,
    };
    let bins = scene.bin_objects(world_from_cam, intr, TILE);
    let mut rgb = vec![[0.0f32; 3]; w * h];
    let mut depth = vec![0.0f32; w * h];
    let mut object = vec![NO_OBJECT; w * h];
    rgb.par_chunks_mut(w)
        .zip(depth.par_chunks_mut(w))
        .zip(object.par_chunks_mut(w))
        .enumerate()
        .for_each(|(y, ((rr, dr), or))| {
            for x in 0..w {
                let (c, t, o) = radiance(scene, &cam, &bins, x as f32, y as f32);
                rr[x] = c;
                dr[x] = t;
                or[x] = o;
            }
        });
    // Anti-alias object edges by supersampling; texture interiors are band-limited by mipmapping.
    let edge = |x: usize, y: usize| {
        let o = object[y * w + x];
        (x > 0 && object[y * w + x - 1] != o)
            || (x + 1 < w && object[y * w + x + 1] != o)
            || (y > 0 && object[(y - 1) * w + x] != o)
            || (y + 1 < h && object[(y + 1) * w + x] != o)
    };
    let edges: Vec<usize> = (0..w * h).filter(|&i| edge(i % w, i / w)).collect();
    let n = EDGE_SUPERSAMPLE;
    let fixed: Vec<[f32; 3]> = edges
        .par_iter()
        .map(|&i| {
            let (x, y) = ((i % w) as f32, (i / w) as f32);
            let mut acc = [0.0f32; 3];
            for sy in 0..n {
                for sx in 0..n {
                    // With an odd count the middle sub-sample is the pixel centre, already cast.
                    let c = if n % 2 == 1 && sx == n / 2 && sy == n / 2 {
                        rgb[i]
                    } else {
                        let ox = (sx as f32 + 0.5) / n as f32 - 0.5;
                        let oy = (sy as f32 + 0.5) / n as f32 - 0.5;
                        radiance(scene, &cam, &bins, x + ox, y + oy).0
                    };
                    for k in 0..3 {
                        acc[k] += c[k];
                    }
                }
            }
            let s = 1.0 / (n * n) as f32;
            [acc[0] * s, acc[1] * s, acc[2] * s]
        })
        .collect();
    for (&i, c) in edges.iter().zip(fixed) {
        rgb[i] = c;
    }
    RenderedFrame {
        world_from_cam: *world_from_cam,
        rgb,
        depth,
        object,
    }
}

/// Exact flow from view `a` to view `b`, and the occlusion mask (true = occluded in `b` or
/// leaving the image). Pixels of `a` without a surface get zero flow and count as occluded.
pub fn flow_between(
    a: &RenderedFrame,
    b: &RenderedFrame,
    intr: &Intrinsics,
) -> (FlowField, Vec<bool>) {
    let (w, h) = (intr.width as usize, intr.height as usize);
    let b_from_a = b.world_from_cam.inverse() * a.world_from_cam;
    // Per pixel the point in b is z·(R·K⁻¹·(x, y, 1)) + t: the ray's x-step and each row's start
    // are fixed, so a pixel costs a few multiply-adds instead of an unprojection and a quaternion
    // rotation.
    let rot = b_from_a.rotation.to_rotation_matrix().into_inner();
    let t_b = b_from_a.translation.vector;
    let ray_dx = rot.column(0) / intr.fx;
    let ray_dy = rot.column(1) / intr.fy;
    let ray_00 = rot.column(2) - ray_dx * intr.cx - ray_dy * intr.cy;
    let mut flow = FlowField::zeros(w, h);
    let mut occ = vec![true; w * h];
    flow.data
        .par_chunks_mut(2 * w)
        .zip(occ.par_chunks_mut(w))
        .enumerate()
        .for_each(|(y, (fr, or))| {
            let ray_row = ray_00 + ray_dy * y as f64;
            for x in 0..w {
                let z = a.depth[y * w + x];
                if z <= 0.0 {
                    continue;
                }
                let pb = Point3::from((ray_row + ray_dx * x as f64) * f64::from(z) + t_b);
                let Some((u, v)) = intr.project(&pb) else {
                    continue;
                };
                fr[2 * x] = (u - x as f64) as f32;
                fr[2 * x + 1] = (v - y as f64) as f32;
                // Nearest pixel: round(u) = floor(u + 0.5) (round(−0.5) = −1 is outside).
                let (xn, yn) = (u + 0.5, v + 0.5);
                if !(xn > 0.0 && yn > 0.0 && xn < w as f64 && yn < h as f64) {
                    continue;
                }
                let j = yn as usize * w + xn as usize;
                let same_surface = b.object[j] == a.object[y * w + x];
                let zb = f64::from(b.depth[j]);
                or[x] =
                    !(same_surface && zb > 0.0 && (pb.z - zb).abs() <= OCCLUSION_DEPTH_TOL * zb);
            }
        });
    (flow, occ)
}
