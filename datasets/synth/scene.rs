//! Analytic scenes for the synthetic world: a textured room or an outdoor ground plane with
//! boxes, spheres and slanted planes, intersected exactly by ray casting.

// Packet code indexes several lane arrays in step and combines conditions with `&`: both
// keep the lane loops branch-free, which is what lets them vectorise.
#![allow(clippy::needless_range_loop, clippy::needless_bitwise_bool)]

use nalgebra::{Rotation3, Vector3};
use rand::{Rng, SeedableRng};

use rayon::prelude::*;

use super::render::NO_OBJECT;
use super::texture::{Materials, Texture, PATTERNS};

type V3 = Vector3<f32>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SceneKind {
    Room,
    Outdoor,
    /// A square room in one texture that repeats every 2 m, with identical objects placed
    /// symmetrically about its centre: places half a turn apart look alike (false loop
    /// closures).
    Repeated,
}

#[derive(Debug, Clone)]
pub enum Shape {
    /// Seen from inside (the room's floor, walls and ceiling).
    RoomBox {
        min: V3,
        max: V3,
    },
    /// Oriented box: centre, half extents, rotation about the vertical axis.
    Box {
        center: V3,
        half: V3,
        world_from_box: Rotation3<f32>,
    },
    Sphere {
        center: V3,
        radius: f32,
    },
    /// Two-sided rectangle: centre, in-plane unit axes, half sizes.
    Quad {
        center: V3,
        axis_u: V3,
        axis_v: V3,
        half_u: f32,
        half_v: f32,
    },
    /// Infinite horizontal plane y = height (world y is up).
    Ground {
        height: f32,
    },
}

#[derive(Debug, Clone)]
pub struct Object {
    pub shape: Shape,
    pub material: usize,
    /// Material index per face (the room box's six faces each have their own; other shapes
    /// use the first), reduced modulo the scene's material count.
    face_material: [u32; 6],
    /// Bounding sphere for a cheap miss test (radius infinite for unbounded shapes).
    bound_center: V3,
    bound_radius: f32,
}

/// The one material of the `Repeated` scene: fractal noise, rich in corners, tiling every
/// `TILE_METRES`.
const REPEATED_MATERIAL: usize = 0;

/// Candidate objects per screen tile (see [`Scene::bin_objects`]).
pub struct TileBins {
    tile: usize,
    tiles_across: usize,
    bins: Vec<Vec<u16>>,
}

impl TileBins {
    /// Object indices that may be hit by rays through pixel (x, y) or within half a pixel of it.
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    pub fn at(&self, x: usize, y: usize) -> &[u16] {
        &self.bins[(y / self.tile) * self.tiles_across + x / self.tile]
    }
}

pub struct Scene {
    pub kind: SceneKind,
    pub objects: Vec<Object>,
    pub materials: Materials,
    /// Unit direction towards the light.
    pub light: V3,
    pub ambient: f32,
    /// Where cameras may move freely (axis-aligned box, world units).
    pub free_min: V3,
    pub free_max: V3,
}

/// Rays cast together: [`LANES`] directions (unnormalised) from one origin.
pub const LANES: usize = 8;
/// One value per ray of a packet.
pub type Lanes = [f32; LANES];

/// A packet of rays from a common origin.
pub struct Rays {
    pub origin: V3,
    /// Direction components, one array per axis.
    pub d: [Lanes; 3],
    /// Squared direction lengths.
    pub dd: Lanes,
}

impl Rays {
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    pub fn new(origin: V3, d: [Lanes; 3]) -> Self {
        let mut dd = [0.0; LANES];
        for l in 0..LANES {
            dd[l] = d[0][l] * d[0][l] + d[1][l] * d[1][l] + d[2][l] * d[2][l];
        }
        Self { origin, d, dd }
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn dir(&self, l: usize) -> V3 {
        V3::new(self.d[0][l], self.d[1][l], self.d[2][l])
    }

    /// Per ray, `a · d`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn dot(&self, a: &V3) -> Lanes {
        let mut out = [0.0; LANES];
        for l in 0..LANES {
            out[l] = a.x * self.d[0][l] + a.y * self.d[1][l] + a.z * self.d[2][l];
        }
        out
    }
}

/// Per ray of a packet, the nearest hit so far.
pub struct Nearest {
    /// Distance along the ray (infinite: no hit).
    pub t: Lanes,
    pub object: [u16; LANES],
    /// For boxes, the face's axis ×2 + 1 if its outward normal is along +axis (filled in by
    /// the shape that won the lane; see [`Scene::surface`]).
    aux: [u8; LANES],
}

impl Nearest {
    /// Takes the lanes of `hit` whose `t` is nearer.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn merge(&mut self, hit: [bool; LANES], t: &Lanes, aux: [u8; LANES], object: u16) {
        for l in 0..LANES {
            let take = hit[l] & (t[l] < self.t[l]);
            self.t[l] = if take { t[l] } else { self.t[l] };
            self.object[l] = if take { object } else { self.object[l] };
            self.aux[l] = if take { aux[l] } else { self.aux[l] };
        }
    }
}

impl Object {
    fn new(shape: Shape, material: usize) -> Self {
        let (c, r) = match &shape {
            Shape::RoomBox { .. } | Shape::Ground { .. } => (V3::zeros(), f32::INFINITY),
            Shape::Box { center, half, .. } => (*center, half.norm()),
            Shape::Sphere { center, radius } => (*center, *radius),
            Shape::Quad {
                center,
                half_u,
                half_v,
                ..
            } => (*center, (half_u * half_u + half_v * half_v).sqrt()),
        };
        Self {
            shape,
            material,
            face_material: [0; 6],
            bound_center: c,
            bound_radius: r,
        }
    }

    /// Whether any ray of the packet passes through the bounding sphere.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn may_hit(&self, rays: &Rays) -> bool {
        if !self.bound_radius.is_finite() {
            return true;
        }
        // Squared distance from the bound centre to a ray's line is |oc|² − (oc·d)²/|d|².
        let oc = self.bound_center - rays.origin;
        let ocd = rays.dot(&oc);
        let (oc2, r2) = (oc.norm_squared(), self.bound_radius * self.bound_radius);
        let mut any = false;
        for l in 0..LANES {
            any |= (oc2 - r2) * rays.dd[l] <= ocd[l] * ocd[l];
        }
        any
    }

    /// Folds this object's hits with t > `t_min` into `best`. Branch-free, lanes innermost,
    /// so the loops vectorise.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn intersect(&self, rays: &Rays, t_min: f32, index: u16, best: &mut Nearest) {
        let o = &rays.origin;
        let d = &rays.d;
        let mut t = [f32::INFINITY; LANES];
        let mut hit = [false; LANES];
        let mut aux = [0u8; LANES];
        match &self.shape {
            Shape::RoomBox { min, max } => {
                // Seen from inside: the nearest exit plane.
                for k in 0..3 {
                    let (to_max, to_min) = (max[k] - o[k], min[k] - o[k]);
                    for l in 0..LANES {
                        let dk = d[k][l];
                        let tk = if dk.abs() > 1e-12 {
                            (if dk > 0.0 { to_max } else { to_min }) / dk
                        } else {
                            f32::INFINITY
                        };
                        let nearer = tk < t[l];
                        t[l] = if nearer { tk } else { t[l] };
                        // The inward normal points along +axis when the ray runs along −axis.
                        let face = 2 * k as u8 + u8::from(dk < 0.0);
                        aux[l] = if nearer { face } else { aux[l] };
                    }
                }
                for l in 0..LANES {
                    hit[l] = t[l] > t_min;
                }
            }
            Shape::Box {
                center,
                half,
                world_from_box,
            } => {
                let lo = world_from_box.inverse_transform_vector(&(o - center));
                let m = world_from_box.matrix();
                let (mut t0, mut t1) = ([t_min; LANES], best.t);
                for k in 0..3 {
                    // Box axis k in world coordinates is column k of world_from_box.
                    let axis = m.column(k);
                    let (to_lo, to_hi) = (-half[k] - lo[k], half[k] - lo[k]);
                    let outside = lo[k].abs() > half[k];
                    for l in 0..LANES {
                        let ld = axis[0] * d[0][l] + axis[1] * d[1][l] + axis[2] * d[2][l];
                        let (ta, tb) = (to_lo / ld, to_hi / ld);
                        let flip = ta > tb;
                        let (mut near, mut far) = if flip { (tb, ta) } else { (ta, tb) };
                        if ld.abs() < 1e-12 {
                            // Parallel to the slab: inside it everywhere, or nowhere.
                            near = f32::NEG_INFINITY;
                            far = if outside {
                                f32::NEG_INFINITY
                            } else {
                                f32::INFINITY
                            };
                        }
                        let later = near > t0[l];
                        t0[l] = if later { near } else { t0[l] };
                        let face = 2 * k as u8 + u8::from(flip);
                        aux[l] = if later { face } else { aux[l] };
                        t1[l] = t1[l].min(far);
                    }
                }
                for l in 0..LANES {
                    t[l] = t0[l];
                    hit[l] = (t0[l] <= t1[l]) & (t0[l] > t_min);
                }
            }
            Shape::Sphere { center, radius } => {
                let oc = o - center;
                let ocd = rays.dot(&oc);
                let c = oc.norm_squared() - radius * radius;
                for l in 0..LANES {
                    let (b, dd) = (ocd[l], rays.dd[l]);
                    let disc = b * b - dd * c;
                    let sq = disc.max(0.0).sqrt();
                    let near = (-b - sq) / dd;
                    let tl = if near > t_min { near } else { (-b + sq) / dd };
                    t[l] = tl;
                    hit[l] = (disc >= 0.0) & (tl > t_min);
                }
            }
            Shape::Quad {
                center,
                axis_u,
                axis_v,
                half_u,
                half_v,
            } => {
                let n = axis_u.cross(axis_v);
                let denom = rays.dot(&n);
                let num = n.dot(&(center - o));
                // Hit point relative to the centre is (o − c) + d·t: project both terms.
                let oc = o - center;
                let (ou, ov) = (oc.dot(axis_u), oc.dot(axis_v));
                let (du, dv) = (rays.dot(axis_u), rays.dot(axis_v));
                for l in 0..LANES {
                    let tl = num / denom[l];
                    let a = ou + du[l] * tl;
                    let b = ov + dv[l] * tl;
                    t[l] = tl;
                    hit[l] = (denom[l].abs() >= 1e-9)
                        & (tl > t_min)
                        & (a.abs() <= *half_u)
                        & (b.abs() <= *half_v);
                }
            }
            Shape::Ground { height } => {
                for l in 0..LANES {
                    let tl = (height - o.y) / d[1][l];
                    t[l] = tl;
                    hit[l] = (d[1][l].abs() >= 1e-9) & (tl > t_min);
                }
            }
        }
        best.merge(hit, &t, aux, index);
    }

    /// Writes the surface (normal facing the ray, texture coordinates, material) of the lanes
    /// whose nearest hit is this object, object `index`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn surface(&self, rays: &Rays, near: &Nearest, index: u16, out: &mut Surfaces) {
        let o = &rays.origin;
        let d = &rays.d;
        let t = &near.t;
        // Hit points.
        let mut p = [[0.0; LANES]; 3];
        for k in 0..3 {
            for l in 0..LANES {
                p[k][l] = o[k] + d[k][l] * t[l];
            }
        }
        let mut normal = [[0.0; LANES]; 3];
        let (mut su, mut sv) = ([0.0; LANES], [0.0; LANES]);
        let mut material = [self.face_material[0]; LANES];
        // Texture coordinates on an axis-aligned face: (z, y), (x, z) or (x, y) by axis.
        let on_face = |q: &[Lanes; 3], axis: u8, l: usize| match axis {
            0 => (q[2][l], q[1][l]),
            1 => (q[0][l], q[2][l]),
            _ => (q[0][l], q[1][l]),
        };
        match &self.shape {
            Shape::RoomBox { .. } => {
                for l in 0..LANES {
                    let (axis, positive) = (near.aux[l] / 2, near.aux[l] % 2 == 1);
                    for k in 0..3 {
                        let along = (k as u8 == axis) as u8 as f32;
                        normal[k][l] = if positive { along } else { -along };
                    }
                    (su[l], sv[l]) = on_face(&p, axis, l);
                    material[l] = self.face_material[usize::from(near.aux[l] % 6)];
                }
            }
            Shape::Box {
                center,
                half,
                world_from_box,
            } => {
                let m = world_from_box.matrix();
                // Hit points in box coordinates.
                let mut pc = p;
                for k in 0..3 {
                    for l in 0..LANES {
                        pc[k][l] -= center[k];
                    }
                }
                let mut lp = [[0.0; LANES]; 3];
                for k in 0..3 {
                    for l in 0..LANES {
                        lp[k][l] =
                            m[(0, k)] * pc[0][l] + m[(1, k)] * pc[1][l] + m[(2, k)] * pc[2][l];
                    }
                }
                for l in 0..LANES {
                    let (axis, positive) = (near.aux[l] / 2, near.aux[l] % 2 == 1);
                    let sign = if positive { 1.0 } else { -1.0 };
                    for j in 0..3 {
                        normal[j][l] = sign * m[(j, usize::from(axis.min(2)))];
                    }
                    let (a, b) = on_face(&lp, axis, l);
                    (su[l], sv[l]) = (a + half.x, b + half.y);
                }
            }
            Shape::Sphere { center, radius } => {
                for l in 0..LANES {
                    let mut n = [0.0; 3];
                    for k in 0..3 {
                        n[k] = (p[k][l] - center[k]) / radius;
                        normal[k][l] = n[k];
                    }
                    su[l] = atan2(n[2], n[0]) * radius;
                    sv[l] = n[1] * radius * 1.5;
                }
            }
            Shape::Quad {
                center,
                axis_u,
                axis_v,
                ..
            } => {
                let n = axis_u.cross(axis_v);
                let facing = rays.dot(&n);
                for l in 0..LANES {
                    let sign = if facing[l] > 0.0 { -1.0 } else { 1.0 };
                    let rel = [p[0][l] - center.x, p[1][l] - center.y, p[2][l] - center.z];
                    for k in 0..3 {
                        normal[k][l] = sign * n[k];
                    }
                    su[l] = rel[0] * axis_u.x + rel[1] * axis_u.y + rel[2] * axis_u.z;
                    sv[l] = rel[0] * axis_v.x + rel[1] * axis_v.y + rel[2] * axis_v.z;
                }
            }
            Shape::Ground { .. } => {
                for l in 0..LANES {
                    normal[1][l] = if d[1][l] < 0.0 { 1.0 } else { -1.0 };
                    (su[l], sv[l]) = (p[0][l], p[2][l]);
                }
            }
        }
        for l in 0..LANES {
            let mine = near.object[l] == index;
            for k in 0..3 {
                out.normal[k][l] = if mine { normal[k][l] } else { out.normal[k][l] };
            }
            out.su[l] = if mine { su[l] } else { out.su[l] };
            out.sv[l] = if mine { sv[l] } else { out.sv[l] };
            out.material[l] = if mine { material[l] } else { out.material[l] };
        }
    }
}

/// Per ray of a packet, the surface at its nearest hit (zeros where it hit nothing).
#[derive(Default)]
struct Surfaces {
    normal: [Lanes; 3],
    su: Lanes,
    sv: Lanes,
    material: [u32; LANES],
}

/// atan2(y, x) to within about 1e-5 rad, without a libm call (so it vectorises).
#[allow(clippy::inline_always)]
#[inline(always)]
fn atan2(y: f32, x: f32) -> f32 {
    let (ax, ay) = (x.abs(), y.abs());
    let a = ax.min(ay) / ax.max(ay).max(f32::MIN_POSITIVE);
    let s = a * a;
    let r = ((-0.046_496_474 * s + 0.159_314_22) * s - 0.327_622_76) * s * a + a;
    let r = if ay > ax {
        std::f32::consts::FRAC_PI_2 - r
    } else {
        r
    };
    let r = if x < 0.0 { std::f32::consts::PI - r } else { r };
    if y < 0.0 {
        -r
    } else {
        r
    }
}

impl Scene {
    /// Builds a scene deterministically from `seed`.
    pub fn new(kind: SceneKind, seed: u64) -> Self {
        Self::with_photos(kind, seed, &[])
    }

    /// [`Scene::new`] with photographs as the first materials' textures (the procedural ones
    /// after them).
    pub fn with_photos(kind: SceneKind, seed: u64, photos: &[image::RgbImage]) -> Self {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x5eed_5cee);
        let n_materials = 10;
        let materials = Materials::new(
            (0..n_materials)
                .into_par_iter()
                .map(|m| match photos.get(m) {
                    Some(photo) => Texture::from_photo(photo),
                    None => Texture::generate(
                        PATTERNS[m % PATTERNS.len()],
                        seed.wrapping_mul(31).wrapping_add(m as u64),
                    ),
                })
                .collect(),
        );
        let mut objects = Vec::new();
        let mat = |rng: &mut rand_pcg::Pcg64| rng.random_range(0..n_materials);
        let (free_min, free_max);
        match kind {
            SceneKind::Room => {
                let min = V3::new(-4.0, 0.0, -3.5);
                let max = V3::new(4.0, 3.0, 3.5);
                objects.push(Object::new(Shape::RoomBox { min, max }, mat(&mut rng)));
                free_min = V3::new(-1.6, 1.1, -1.2);
                free_max = V3::new(1.6, 1.9, 1.2);
                // Furniture-like boxes around the free region.
                for _ in 0..8 {
                    let half = V3::new(
                        rng.random_range(0.2..0.6),
                        rng.random_range(0.2..0.7),
                        rng.random_range(0.2..0.6),
                    );
                    let center = ring_position(&mut rng, 2.6, 3.4, 2.0, 2.9, half.y);
                    let yaw = rng.random_range(0.0..std::f32::consts::PI);
                    objects.push(Object::new(
                        Shape::Box {
                            center,
                            half,
                            world_from_box: Rotation3::from_axis_angle(&V3::y_axis(), yaw),
                        },
                        mat(&mut rng),
                    ));
                }
                for _ in 0..5 {
                    let radius = rng.random_range(0.15..0.4);
                    let mut center = ring_position(&mut rng, 2.4, 3.5, 1.8, 3.0, radius);
                    center.y = rng.random_range(radius..2.4);
                    objects.push(Object::new(Shape::Sphere { center, radius }, mat(&mut rng)));
                }
                for _ in 0..4 {
                    let center = ring_position(&mut rng, 2.8, 3.6, 2.3, 3.1, 1.2);
                    let yaw = rng.random_range(0.0..std::f32::consts::TAU);
                    let tilt = rng.random_range(-0.6..0.6);
                    let rot = Rotation3::from_axis_angle(&V3::y_axis(), yaw)
                        * Rotation3::from_axis_angle(&V3::x_axis(), tilt);
                    objects.push(Object::new(
                        Shape::Quad {
                            center,
                            axis_u: rot * V3::x(),
                            axis_v: rot * V3::y(),
                            half_u: rng.random_range(0.3..0.8),
                            half_v: rng.random_range(0.3..0.8),
                        },
                        mat(&mut rng),
                    ));
                }
            }
            SceneKind::Repeated => {
                // Square, so the loop is a circle and the room looks the same half a turn on.
                objects.push(Object::new(
                    Shape::RoomBox {
                        min: V3::new(-4.0, 0.0, -4.0),
                        max: V3::new(4.0, 3.0, 4.0),
                    },
                    REPEATED_MATERIAL,
                ));
                free_min = V3::new(-1.4, 1.1, -1.4);
                free_max = V3::new(1.4, 1.9, 1.4);
                // Identical boxes and spheres, each with its twin half a turn round the centre.
                let half = V3::new(0.4, 0.5, 0.4);
                for (x, z) in [(3.0, 0.0), (-3.0, 0.0), (0.0, 3.0), (0.0, -3.0)] {
                    objects.push(Object::new(
                        Shape::Box {
                            center: V3::new(x, half.y, z),
                            half,
                            world_from_box: Rotation3::identity(),
                        },
                        REPEATED_MATERIAL,
                    ));
                }
                for (x, z) in [(2.6, 2.6), (-2.6, -2.6), (2.6, -2.6), (-2.6, 2.6)] {
                    objects.push(Object::new(
                        Shape::Sphere {
                            center: V3::new(x, 1.4, z),
                            radius: 0.35,
                        },
                        REPEATED_MATERIAL,
                    ));
                }
            }
            SceneKind::Outdoor => {
                objects.push(Object::new(Shape::Ground { height: 0.0 }, mat(&mut rng)));
                free_min = V3::new(-3.0, 1.2, -3.0);
                free_max = V3::new(3.0, 2.0, 3.0);
                // Buildings far away, objects at middle distance.
                for _ in 0..14 {
                    let half = V3::new(
                        rng.random_range(1.0..4.0),
                        rng.random_range(2.0..8.0),
                        rng.random_range(1.0..4.0),
                    );
                    let center = ring_position(&mut rng, 15.0, 40.0, 15.0, 40.0, half.y);
                    objects.push(Object::new(
                        Shape::Box {
                            center,
                            half,
                            world_from_box: Rotation3::from_axis_angle(
                                &V3::y_axis(),
                                rng.random_range(0.0..1.5),
                            ),
                        },
                        mat(&mut rng),
                    ));
                }
                for _ in 0..10 {
                    let half = V3::new(
                        rng.random_range(0.3..1.0),
                        rng.random_range(0.3..1.2),
                        rng.random_range(0.3..1.0),
                    );
                    let center = ring_position(&mut rng, 5.0, 12.0, 5.0, 12.0, half.y);
                    objects.push(Object::new(
                        Shape::Box {
                            center,
                            half,
                            world_from_box: Rotation3::from_axis_angle(
                                &V3::y_axis(),
                                rng.random_range(0.0..1.5),
                            ),
                        },
                        mat(&mut rng),
                    ));
                }
                for _ in 0..6 {
                    let radius = rng.random_range(0.4..1.5);
                    let center = ring_position(&mut rng, 6.0, 20.0, 6.0, 20.0, radius);
                    objects.push(Object::new(Shape::Sphere { center, radius }, mat(&mut rng)));
                }
            }
        }
        for obj in &mut objects {
            obj.face_material = if kind == SceneKind::Repeated {
                [obj.material as u32; 6]
            } else {
                std::array::from_fn(|face| ((obj.material + face) % n_materials) as u32)
            };
        }
        Self {
            kind,
            objects,
            materials,
            light: V3::new(0.35, 0.85, 0.4).normalize(),
            ambient: 0.55,
            free_min,
            free_max,
        }
    }

    /// Per ray of the packet, the nearest hit with t > `t_min` among the objects with the
    /// given indices.
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    pub fn nearest(&self, rays: &Rays, t_min: f32, candidates: &[u16]) -> Nearest {
        let mut best = Nearest {
            t: [f32::INFINITY; LANES],
            object: [NO_OBJECT; LANES],
            aux: [0; LANES],
        };
        for &i in candidates {
            let obj = &self.objects[usize::from(i)];
            if obj.may_hit(rays) {
                obj.intersect(rays, t_min, i, &mut best);
            }
        }
        best
    }

    /// For each `tile`×`tile` pixel block of a view, the objects whose bounding sphere may cover it
    /// (unbounded objects everywhere), so each ray tests only those.
    pub fn bin_objects(
        &self,
        world_from_cam: &streamrecon_core::frame::Pose,
        k: &streamrecon_core::frame::Intrinsics,
        tile: usize,
    ) -> TileBins {
        let (tw, th) = (
            (k.width as usize).div_ceil(tile),
            (k.height as usize).div_ceil(tile),
        );
        let mut bins = vec![Vec::new(); tw * th];
        let cam_from_world = world_from_cam.inverse();
        for (i, obj) in self.objects.iter().enumerate() {
            let full = (0, 0, tw - 1, th - 1);
            let range = if obj.bound_radius.is_finite() {
                let c = cam_from_world
                    * nalgebra::Point3::new(
                        f64::from(obj.bound_center.x),
                        f64::from(obj.bound_center.y),
                        f64::from(obj.bound_center.z),
                    );
                let r = f64::from(obj.bound_radius);
                if c.z + r <= 1e-3 {
                    continue; // entirely behind the camera
                }
                if c.z - r <= 1e-2 {
                    Some(full)
                } else {
                    let (z0, z1) = (c.z - r, c.z + r);
                    let ext = |lo: f64, hi: f64, f: f64, pc: f64| {
                        let a = [lo / z0, lo / z1, hi / z0, hi / z1];
                        let mn = a.iter().copied().fold(f64::INFINITY, f64::min);
                        let mx = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        (f * mn + pc - 1.0, f * mx + pc + 1.0)
                    };
                    let (u0, u1) = ext(c.x - r, c.x + r, k.fx, k.cx);
                    let (v0, v1) = ext(c.y - r, c.y + r, k.fy, k.cy);
                    if u1 < 0.0 || v1 < 0.0 || u0 > f64::from(k.width) || v0 > f64::from(k.height) {
                        None
                    } else {
                        let cl = |v: f64, n: usize| ((v.max(0.0) as usize) / tile).min(n - 1);
                        Some((cl(u0, tw), cl(v0, th), cl(u1, tw), cl(v1, th)))
                    }
                }
            } else {
                Some(full)
            };
            if let Some((x0, y0, x1, y1)) = range {
                for ty in y0..=y1 {
                    for tx in x0..=x1 {
                        bins[ty * tw + tx].push(i as u16);
                    }
                }
            }
        }
        TileBins {
            tile,
            tiles_across: tw,
            bins,
        }
    }

    /// Colours of a packet's nearest hits among `candidates`: Lambertian shading of the
    /// surface textures, filtered for each pixel's footprint (`fx`: the focal length in pixels);
    /// sky where a ray hit nothing.
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    pub fn shade(
        &self,
        rays: &Rays,
        near: &Nearest,
        candidates: &[u16],
        fx: f32,
    ) -> [[f32; 3]; LANES] {
        let mut surf = Surfaces::default();
        for &i in candidates {
            if near.object.contains(&i) {
                self.objects[usize::from(i)].surface(rays, near, i, &mut surf);
            }
        }
        let (mut footprint, mut light) = ([0.0; LANES], [0.0; LANES]);
        for l in 0..LANES {
            let n = [surf.normal[0][l], surf.normal[1][l], surf.normal[2][l]];
            let dn = rays.dd[l].sqrt();
            let nd = n[0] * rays.d[0][l] + n[1] * rays.d[1][l] + n[2] * rays.d[2][l];
            let cos = (nd / dn).abs().max(0.2);
            footprint[l] = near.t[l] * dn / fx / cos;
            let nl = n[0] * self.light.x + n[1] * self.light.y + n[2] * self.light.z;
            light[l] = self.ambient + (1.0 - self.ambient) * nl.max(0.0);
        }
        let albedo = self
            .materials
            .sample(&surf.material, &surf.su, &surf.sv, &footprint);
        let mut out = [[0.0; 3]; LANES];
        for (l, o) in out.iter_mut().enumerate() {
            *o = if near.object[l] == NO_OBJECT {
                Self::sky(&rays.dir(l))
            } else {
                // Not `array::map`: its closure may be compiled out of line.
                [
                    albedo[0][l] * light[l],
                    albedo[1][l] * light[l],
                    albedo[2][l] * light[l],
                ]
            };
        }
        out
    }

    /// Sky colour for rays that hit nothing (outdoor scenes).
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    pub fn sky(d: &V3) -> [f32; 3] {
        let up = (d.y / d.norm()).clamp(-1.0, 1.0);
        let t = 0.5 + 0.5 * up;
        [0.55 + 0.2 * t, 0.7 + 0.15 * t, 0.9 + 0.1 * t]
    }
}

/// A random position in the ring between an inner and an outer axis-aligned rectangle (x, z), at height `y`.
fn ring_position(
    rng: &mut rand_pcg::Pcg64,
    inner_x: f32,
    outer_x: f32,
    inner_z: f32,
    outer_z: f32,
    y: f32,
) -> V3 {
    loop {
        let x = rng.random_range(-outer_x..outer_x);
        let z = rng.random_range(-outer_z..outer_z);
        if x.abs() > inner_x || z.abs() > inner_z {
            return V3::new(x, y, z);
        }
    }
}
