//! Two-view triangulation of rays (midpoint method), used per track and per pixel.

use nalgebra::{Point3, Vector3};

/// The point closest to two rays `o1 + s·d1` and `o2 + t·d2` (unit or not), with the parallax angle
/// between the rays in radians. `None` if the rays are (near) parallel or the point lies behind
/// either origin.
#[inline]
pub fn midpoint(
    o1: &Point3<f64>,
    d1: &Vector3<f64>,
    o2: &Point3<f64>,
    d2: &Vector3<f64>,
) -> Option<(Point3<f64>, f64)> {
    midpoint_cos(o1, d1, o2, d2).map(|(p, cos)| (p, cos.acos()))
}

/// Like [`midpoint`], but returns the cosine of the parallax angle (no `acos`). (flowvo's dense
/// depth inlines a specialised copy of this per pixel.)
#[inline]
pub fn midpoint_cos(
    o1: &Point3<f64>,
    d1: &Vector3<f64>,
    o2: &Point3<f64>,
    d2: &Vector3<f64>,
) -> Option<(Point3<f64>, f64)> {
    let w0 = o1 - o2;
    let a = d1.dot(d1);
    let b = d1.dot(d2);
    let c = d2.dot(d2);
    let d = d1.dot(&w0);
    let e = d2.dot(&w0);
    let denom = a * c - b * b;
    if denom.abs() < 1e-12 * a * c {
        return None;
    }
    let s = (b * e - c * d) / denom;
    let t = (a * e - b * d) / denom;
    if s <= 0.0 || t <= 0.0 {
        return None;
    }
    let p = Point3::from((o1.coords + d1 * s + o2.coords + d2 * t) * 0.5);
    Some((p, (b / (a * c).sqrt()).clamp(-1.0, 1.0)))
}
