//! Analytic scenes for the synthetic world: a textured room or an outdoor ground plane with
//! boxes, spheres and slanted planes, intersected exactly by ray casting.

use nalgebra::{Rotation3, Vector3};
use rand::{Rng, SeedableRng};

use super::texture::{Texture, PATTERNS};

type V3 = Vector3<f32>;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum SceneKind {
    Room,
    Outdoor,
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
    /// Bounding sphere for a cheap miss test (radius infinite for unbounded shapes).
    bound_center: V3,
    bound_radius: f32,
}

/// Candidate objects per screen tile (see [`Scene::bin_objects`]).
pub struct TileBins {
    tile: usize,
    tiles_across: usize,
    bins: Vec<Vec<u16>>,
}

impl TileBins {
    /// Object indices that may be hit by rays through pixel (x, y) or within half a pixel of it.
    #[inline]
    pub fn at(&self, x: usize, y: usize) -> &[u16] {
        &self.bins[(y / self.tile) * self.tiles_across + x / self.tile]
    }
}

/// A ray hit: distance along the (unnormalised) ray, unit normal facing the ray, surface coordinates.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub t: f32,
    pub normal: V3,
    pub su: f32,
    pub sv: f32,
    pub object: u16,
    /// Face of the room box (each face has its own material), 0 elsewhere.
    pub face: u8,
}

pub struct Scene {
    pub kind: SceneKind,
    pub objects: Vec<Object>,
    pub materials: Vec<Texture>,
    /// Unit direction towards the light.
    pub light: V3,
    pub ambient: f32,
    /// Where cameras may move freely (axis-aligned box, world units).
    pub free_min: V3,
    pub free_max: V3,
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
            bound_center: c,
            bound_radius: r,
        }
    }

    /// Nearest hit with t in (t_min, t_max).
    #[inline]
    fn intersect(
        &self,
        o: &V3,
        d: &V3,
        dd: f32,
        t_min: f32,
        t_max: f32,
    ) -> Option<(f32, V3, f32, f32)> {
        if self.bound_radius.is_finite() {
            // Distance from the bound centre to the ray line (d unnormalised).
            let oc = self.bound_center - o;
            let tc = oc.dot(d) / dd;
            let closest2 = (oc - d * tc).norm_squared();
            if closest2 > self.bound_radius * self.bound_radius {
                return None;
            }
        }
        match &self.shape {
            Shape::RoomBox { min, max } => {
                let mut t_exit = f32::INFINITY;
                let mut axis = 0;
                for k in 0..3 {
                    if d[k].abs() > 1e-12 {
                        let bound = if d[k] > 0.0 { max[k] } else { min[k] };
                        let t = (bound - o[k]) / d[k];
                        if t < t_exit {
                            t_exit = t;
                            axis = k;
                        }
                    }
                }
                if !(t_exit > t_min && t_exit < t_max) {
                    return None;
                }
                let p = o + d * t_exit;
                let mut n = V3::zeros();
                n[axis] = -d[axis].signum();
                let (a, b) = match axis {
                    0 => (p.z, p.y),
                    1 => (p.x, p.z),
                    _ => (p.x, p.y),
                };
                Some((t_exit, n, a, b))
            }
            Shape::Box {
                center,
                half,
                world_from_box,
            } => {
                let lo = world_from_box.inverse_transform_vector(&(o - center));
                let ld = world_from_box.inverse_transform_vector(d);
                let (mut t0, mut t1) = (t_min, t_max);
                let mut axis = 0;
                let mut sign = 1.0;
                for k in 0..3 {
                    if ld[k].abs() < 1e-12 {
                        if lo[k].abs() > half[k] {
                            return None;
                        }
                        continue;
                    }
                    let inv = 1.0 / ld[k];
                    let mut ta = (-half[k] - lo[k]) * inv;
                    let mut tb = (half[k] - lo[k]) * inv;
                    let mut s = -1.0;
                    if ta > tb {
                        std::mem::swap(&mut ta, &mut tb);
                        s = 1.0;
                    }
                    if ta > t0 {
                        t0 = ta;
                        axis = k;
                        sign = s;
                    }
                    t1 = t1.min(tb);
                    if t0 > t1 {
                        return None;
                    }
                }
                if t0 <= t_min {
                    return None;
                }
                let mut ln = V3::zeros();
                ln[axis] = sign;
                let lp = lo + ld * t0;
                let (a, b) = match axis {
                    0 => (lp.z, lp.y),
                    1 => (lp.x, lp.z),
                    _ => (lp.x, lp.y),
                };
                Some((t0, world_from_box * ln, a + half.x, b + half.y))
            }
            Shape::Sphere { center, radius } => {
                let oc = o - center;
                let b = oc.dot(d);
                let c = oc.norm_squared() - radius * radius;
                let disc = b * b - dd * c;
                if disc < 0.0 {
                    return None;
                }
                let sq = disc.sqrt();
                let mut t = (-b - sq) / dd;
                if t <= t_min {
                    t = (-b + sq) / dd;
                }
                if !(t > t_min && t < t_max) {
                    return None;
                }
                let n = (o + d * t - center) / *radius;
                let su = n.z.atan2(n.x) * radius;
                let sv = n.y * radius * 1.5;
                Some((t, n, su, sv))
            }
            Shape::Quad {
                center,
                axis_u,
                axis_v,
                half_u,
                half_v,
            } => {
                let n = axis_u.cross(axis_v);
                let denom = n.dot(d);
                if denom.abs() < 1e-9 {
                    return None;
                }
                let t = n.dot(&(center - o)) / denom;
                if !(t > t_min && t < t_max) {
                    return None;
                }
                let rel = o + d * t - center;
                let a = rel.dot(axis_u);
                let b = rel.dot(axis_v);
                if a.abs() > *half_u || b.abs() > *half_v {
                    return None;
                }
                Some((t, if denom > 0.0 { -n } else { n }, a, b))
            }
            Shape::Ground { height } => {
                if d.y.abs() < 1e-9 {
                    return None;
                }
                let t = (height - o.y) / d.y;
                if !(t > t_min && t < t_max) {
                    return None;
                }
                let p = o + d * t;
                Some((
                    t,
                    V3::new(0.0, if d.y < 0.0 { 1.0 } else { -1.0 }, 0.0),
                    p.x,
                    p.z,
                ))
            }
        }
    }
}

impl Scene {
    /// Builds a scene deterministically from `seed`.
    pub fn new(kind: SceneKind, seed: u64) -> Self {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x5eed_5cee);
        let n_materials = 10;
        let materials: Vec<Texture> = (0..n_materials)
            .map(|m| {
                Texture::generate(
                    PATTERNS[m % PATTERNS.len()],
                    seed.wrapping_mul(31).wrapping_add(m as u64),
                )
            })
            .collect();
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

    /// Nearest hit along `o + t·d` (d unnormalised), t > `t_min`, among all objects.
    #[inline]
    pub fn intersect(&self, o: &V3, d: &V3, t_min: f32) -> Option<Hit> {
        self.intersect_among(o, d, t_min, 0..self.objects.len())
    }

    /// Nearest hit among the objects with the given indices.
    #[inline]
    pub fn intersect_among(
        &self,
        o: &V3,
        d: &V3,
        t_min: f32,
        candidates: impl IntoIterator<Item = usize>,
    ) -> Option<Hit> {
        let dd = d.norm_squared();
        let mut best: Option<(f32, V3, f32, f32, usize)> = None;
        let mut t_max = f32::INFINITY;
        for i in candidates {
            let obj = &self.objects[i];
            if let Some((t, normal, su, sv)) = obj.intersect(o, d, dd, t_min, t_max) {
                t_max = t;
                best = Some((t, normal, su, sv, i));
            }
        }
        let (t, normal, su, sv, i) = best?;
        let face = match self.objects[i].shape {
            Shape::RoomBox { .. } => {
                let axis = (0..3).find(|&k| normal[k] != 0.0).unwrap_or(0);
                (axis * 2 + usize::from(normal[axis] > 0.0)) as u8
            }
            _ => 0,
        };
        Some(Hit {
            t,
            normal,
            su,
            sv,
            object: i as u16,
            face,
        })
    }

    /// For each `tile`×`tile` pixel block of a view, the objects whose bounding sphere may cover it
    /// (unbounded objects everywhere), so each ray tests only those.
    pub fn bin_objects(
        &self,
        world_from_cam: &crate::frame::Pose,
        k: &crate::frame::Intrinsics,
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

    /// Lambertian shade of a hit for a pixel footprint of `footprint` metres.
    #[inline]
    pub fn shade(&self, hit: &Hit, footprint: f32) -> [f32; 3] {
        let m = self.objects[hit.object as usize].material + hit.face as usize;
        let tex = &self.materials[m % self.materials.len()];
        let albedo = tex.sample(hit.su, hit.sv, footprint);
        let diffuse = hit.normal.dot(&self.light).max(0.0);
        let k = self.ambient + (1.0 - self.ambient) * diffuse;
        [albedo[0] * k, albedo[1] * k, albedo[2] * k]
    }

    /// Sky colour for rays that hit nothing (outdoor scenes).
    #[inline]
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
