//! Ray-cast rendering with exact ground truth: RGB (edge-supersampled), depth, object ids, and
//! optical flow / occlusion between two rendered frames.

// Packet code indexes several lane arrays in step and combines conditions with `&`: both
// keep the lane loops branch-free, which is what lets them vectorise.
#![allow(clippy::needless_range_loop, clippy::needless_bitwise_bool)]

use nalgebra::Vector3;
use rayon::prelude::*;

use super::scene::{Lanes, Rays, Scene, TileBins, LANES};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::{Intrinsics, Pose};
use streamrecon_core::simd::{vectorized, Kernel};

/// Pixels per side of a binning tile (a multiple of [`LANES`], so a packet lies in one tile).
const TILE: usize = 16;
const _: () = assert!(TILE.is_multiple_of(LANES));
/// Object id of pixels (and packet rays) that see no surface.
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
    /// Ray direction (unnormalised, camera z = 1) of pixel (x, y) is `ray_00 + x·ray_dx + y·ray_dy`.
    ray_00: Vector3<f32>,
    ray_dx: Vector3<f32>,
    ray_dy: Vector3<f32>,
    fx: f32,
}

impl Camera {
    fn new(intr: &Intrinsics, world_from_cam: &Pose) -> Self {
        let rot: nalgebra::Matrix3<f32> =
            world_from_cam.rotation.to_rotation_matrix().matrix().cast();
        let (fx, fy) = (intr.fx as f32, intr.fy as f32);
        let ray_dx = rot.column(0) / fx;
        let ray_dy = rot.column(1) / fy;
        Self {
            origin: world_from_cam.translation.vector.cast(),
            ray_00: rot.column(2) - ray_dx * intr.cx as f32 - ray_dy * intr.cy as f32,
            ray_dx,
            ray_dy,
            fx,
        }
    }

    /// The rays through the points (`xs[l]`, `ys[l]`).
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    fn rays(&self, xs: &Lanes, ys: &Lanes) -> Rays {
        let mut d = [[0.0; LANES]; 3];
        for k in 0..3 {
            for l in 0..LANES {
                d[k][l] = self.ray_00[k] + self.ray_dx[k] * xs[l] + self.ray_dy[k] * ys[l];
            }
        }
        Rays::new(self.origin, d)
    }
}

/// Colour, depth and object of each ray of a packet.
#[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
#[inline(always)]
fn radiance(
    scene: &Scene,
    cam: &Camera,
    rays: &Rays,
    candidates: &[u16],
) -> ([[f32; 3]; LANES], Lanes, [u16; LANES]) {
    let near = scene.nearest(rays, 1e-4, candidates);
    let colour = scene.shade(rays, &near, candidates, cam.fx);
    let mut depth = near.t;
    for (z, &o) in depth.iter_mut().zip(&near.object) {
        *z = if o == NO_OBJECT { 0.0 } else { *z };
    }
    (colour, depth, near.object)
}

/// One image row of [`render`], [`LANES`] pixels at a time.
struct RenderRow<'a> {
    scene: &'a Scene,
    cam: &'a Camera,
    bins: &'a TileBins,
    y: usize,
    rgb: &'a mut [[f32; 3]],
    depth: &'a mut [f32],
    object: &'a mut [u16],
}

impl Kernel for RenderRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let w = self.rgb.len();
        let ys = [self.y as f32; LANES];
        for x0 in (0..w).step_by(LANES) {
            // A last partial packet repeats the row's last pixel.
            let mut xs: Lanes = [0.0; LANES];
            for (l, x) in xs.iter_mut().enumerate() {
                *x = (x0 + l).min(w - 1) as f32;
            }
            // Packets start at multiples of LANES, which divides TILE: one tile per packet.
            let rays = self.cam.rays(&xs, &ys);
            let (colour, depth, object) =
                radiance(self.scene, self.cam, &rays, self.bins.at(x0, self.y));
            let n = LANES.min(w - x0);
            self.rgb[x0..x0 + n].copy_from_slice(&colour[..n]);
            self.depth[x0..x0 + n].copy_from_slice(&depth[..n]);
            self.object[x0..x0 + n].copy_from_slice(&object[..n]);
        }
    }
}

/// The anti-aliased colour of one edge pixel: the mean of an `EDGE_SUPERSAMPLE`² grid of
/// sub-samples, whose off-centre ones make one packet.
struct EdgePixel<'a> {
    scene: &'a Scene,
    cam: &'a Camera,
    bins: &'a TileBins,
    x: usize,
    y: usize,
    centre: [f32; 3],
}

const _: () = assert!(EDGE_SUPERSAMPLE * EDGE_SUPERSAMPLE == LANES + 1);

impl Kernel for EdgePixel<'_> {
    type Output = [f32; 3];

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) -> [f32; 3] {
        let n = EDGE_SUPERSAMPLE;
        let offset = |s: usize| (s as f32 + 0.5) / n as f32 - 0.5;
        // Sub-samples in row-major order, skipping the centre (already cast).
        let sub = |l: usize| {
            let s = if l >= LANES / 2 { l + 1 } else { l };
            (offset(s % n), offset(s / n))
        };
        let (mut xs, mut ys): (Lanes, Lanes) = ([0.0; LANES], [0.0; LANES]);
        for l in 0..LANES {
            (xs[l], ys[l]) = (self.x as f32 + sub(l).0, self.y as f32 + sub(l).1);
        }
        let rays = self.cam.rays(&xs, &ys);
        let (colour, _, _) = radiance(self.scene, self.cam, &rays, self.bins.at(self.x, self.y));
        let mut acc = self.centre;
        for c in colour {
            for k in 0..3 {
                acc[k] += c[k];
            }
        }
        let s = 1.0 / (n * n) as f32;
        [acc[0] * s, acc[1] * s, acc[2] * s]
    }
}

/// Renders the scene from `world_from_cam`.
pub fn render(scene: &Scene, intr: &Intrinsics, world_from_cam: &Pose) -> RenderedFrame {
    let (w, h) = (intr.width as usize, intr.height as usize);
    let cam = Camera::new(intr, world_from_cam);
    let bins = scene.bin_objects(world_from_cam, intr, TILE);
    let mut rgb = vec![[0.0f32; 3]; w * h];
    let mut depth = vec![0.0f32; w * h];
    let mut object = vec![NO_OBJECT; w * h];
    rgb.par_chunks_mut(w)
        .zip(depth.par_chunks_mut(w))
        .zip(object.par_chunks_mut(w))
        .enumerate()
        .for_each(|(y, ((rgb, depth), object))| {
            vectorized(RenderRow {
                scene,
                cam: &cam,
                bins: &bins,
                y,
                rgb,
                depth,
                object,
            });
        });
    // Anti-alias object edges by supersampling; texture interiors are band-limited by mipmapping.
    let edge = |x: usize, y: usize| {
        let o = object[y * w + x];
        (x > 0 && object[y * w + x - 1] != o)
            || (x + 1 < w && object[y * w + x + 1] != o)
            || (y > 0 && object[(y - 1) * w + x] != o)
            || (y + 1 < h && object[(y + 1) * w + x] != o)
    };
    let edges: Vec<usize> = (0..h)
        .into_par_iter()
        .flat_map_iter(|y| (0..w).filter(move |&x| edge(x, y)).map(move |x| y * w + x))
        .collect();
    let fixed: Vec<[f32; 3]> = edges
        .par_iter()
        .map(|&i| {
            vectorized(EdgePixel {
                scene,
                cam: &cam,
                bins: &bins,
                x: i % w,
                y: i / w,
                centre: rgb[i],
            })
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
    let ray_dx = rot.column(0) / intr.fx;
    let ray_dy = rot.column(1) / intr.fy;
    let ray_00 = rot.column(2) - ray_dx * intr.cx - ray_dy * intr.cy;
    let geometry = FlowGeometry {
        projection: Projection {
            ray_00: ray_00.into(),
            ray_dx: ray_dx.into(),
            ray_dy: ray_dy.into(),
            t_b: b_from_a.translation.vector.into(),
            k: [intr.fx, intr.fy, intr.cx, intr.cy],
            size: (w, h),
        },
        a,
        b,
    };
    let mut flow = FlowField::zeros(w, h);
    let mut occ = vec![true; w * h];
    flow.data
        .par_chunks_mut(2 * w)
        .zip(occ.par_chunks_mut(w))
        .enumerate()
        .for_each_init(
            || Scratch {
                du: vec![0.0; w],
                dv: vec![0.0; w],
                zb: vec![0.0; w],
                target: vec![u32::MAX; w],
            },
            |scratch, (y, (flow, occluded))| {
                vectorized(FlowRow {
                    geometry: &geometry,
                    y,
                    flow,
                    occluded,
                    scratch,
                });
            },
        );
    (flow, occ)
}

/// What every row of one [`flow_between`] call reads.
struct FlowGeometry<'a> {
    projection: Projection,
    a: &'a RenderedFrame,
    b: &'a RenderedFrame,
}

/// One row of [`flow_between`], in two passes: the projections (vectorised), then the
/// occlusion test's reads of view `b` at the nearest pixels.
struct FlowRow<'a> {
    geometry: &'a FlowGeometry<'a>,
    y: usize,
    flow: &'a mut [f32],
    occluded: &'a mut [bool],
    scratch: &'a mut Scratch,
}

/// Per-pixel values of one row, between [`project_row`] and the occlusion test.
struct Scratch {
    /// Flow components.
    du: Vec<f32>,
    dv: Vec<f32>,
    /// Depth of the pixel's point in b, and b's nearest pixel (`u32::MAX`: none).
    zb: Vec<f64>,
    target: Vec<u32>,
}

/// Pixel (x, y) of view a at depth z lies at `z·(ray_00 + x·ray_dx + y·ray_dy) + t_b` in view
/// b's frame (component-wise arrays, so [`project_row`]'s loop vectorises); `k` = (fx, fy, cx,
/// cy), `size` = (width, height).
struct Projection {
    ray_00: [f64; 3],
    ray_dx: [f64; 3],
    ray_dy: [f64; 3],
    t_b: [f64; 3],
    k: [f64; 4],
    size: (usize, usize),
}

/// Projects one row of view a's pixels into view b: flow, depth in b and nearest pixel.
/// Slices as arguments and plain indexed loops, so the loop vectorises (reached through struct
/// fields, the slices may alias as far as the compiler knows).
#[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
#[inline(always)]
fn project_row(
    projection: &Projection,
    y: usize,
    depth: &[f32],
    du: &mut [f32],
    dv: &mut [f32],
    zb: &mut [f64],
    target: &mut [u32],
) {
    let Projection {
        ray_00,
        ray_dx: [dx0, dx1, dx2],
        ray_dy,
        t_b: [t0, t1, t2],
        k: [fx, fy, cx, cy],
        size: (w, h),
    } = *projection;
    let (wf, hf, yf) = (w as f64, h as f64, y as f64);
    let [r0, r1, r2] = [0, 1, 2].map(|k| ray_00[k] + ray_dy[k] * yf);
    // Exact lengths up front, so the loop has no bounds checks (which stop vectorisation).
    let n = w.min(depth.len());
    let (depth, du, dv, zb, target) = (
        &depth[..n],
        &mut du[..n],
        &mut dv[..n],
        &mut zb[..n],
        &mut target[..n],
    );
    for x in 0..n {
        let (z, xf) = (f64::from(depth[x]), x as f64);
        let px = (r0 + dx0 * xf) * z + t0;
        let py = (r1 + dx1 * xf) * z + t1;
        let pz = (r2 + dx2 * xf) * z + t2;
        let seen = (z > 0.0) & (pz > 1e-9);
        let u = fx * px / pz + cx;
        let v = fy * py / pz + cy;
        du[x] = if seen { (u - xf) as f32 } else { 0.0 };
        dv[x] = if seen { (v - yf) as f32 } else { 0.0 };
        // Nearest pixel: round(u) = floor(u + 0.5) (round(−0.5) = −1 is outside).
        let (xn, yn) = (u + 0.5, v + 0.5);
        let inside = seen & (xn > 0.0) & (yn > 0.0) & (xn < wf) & (yn < hf);
        // i32, not usize: AVX2 converts floats to 32-bit integers only. Off-image points
        // give garbage here, dropped by `inside`.
        let j = (yn as i32).wrapping_mul(w as i32).wrapping_add(xn as i32) as u32;
        target[x] = if inside { j } else { u32::MAX };
        zb[x] = pz;
    }
}

impl Kernel for FlowRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let FlowGeometry { projection, a, b } = self.geometry;
        let (w, y) = (projection.size.0, self.y);
        let depth = &a.depth[y * w..(y + 1) * w];
        let Scratch { du, dv, zb, target } = self.scratch;
        project_row(projection, y, depth, du, dv, zb, target);
        for ((f, &u), &v) in self.flow.chunks_exact_mut(2).zip(&*du).zip(&*dv) {
            f.copy_from_slice(&[u, v]);
        }
        let object = &a.object[y * w..(y + 1) * w];
        for x in 0..w {
            let j = target[x] as usize;
            let (Some(&ob), Some(&db)) = (b.object.get(j), b.depth.get(j)) else {
                continue;
            };
            let zb_seen = f64::from(db);
            self.occluded[x] = !(ob == object[x]
                && zb_seen > 0.0
                && (zb[x] - zb_seen).abs() <= OCCLUSION_DEPTH_TOL * zb_seen);
        }
    }
}
