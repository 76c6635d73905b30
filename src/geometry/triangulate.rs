//! Triangulation of rays: two views (midpoint method), used per track and per pixel, and any
//! number of views (the point nearest to all rays), used per track.

use nalgebra::{Matrix3, Point3, Vector3};

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

/// The point nearest to all the rays `o + s·d` (least squares over the squared distances: the
/// linear midpoint method for any number of views). `None` for fewer than two rays, rays too
/// close to parallel to place it, or a point behind any origin.
pub fn nearest_to_rays(
    rays: impl IntoIterator<Item = (Point3<f64>, Vector3<f64>)>,
) -> Option<Point3<f64>> {
    let rays: Vec<(Point3<f64>, Vector3<f64>)> = rays
        .into_iter()
        .filter_map(|(o, d)| d.try_normalize(1e-12).map(|d| (o, d)))
        .collect();
    if rays.len() < 2 {
        return None;
    }
    // Σ (I − d dᵀ) p = Σ (I − d dᵀ) o: each term projects out its ray's direction.
    let (mut a, mut b) = (Matrix3::zeros(), Vector3::zeros());
    for (o, d) in &rays {
        let m = Matrix3::identity() - d * d.transpose();
        a += m;
        b += m * o.coords;
    }
    // Parallel rays leave `a` with a null direction: its smallest eigenvalue tells.
    let eig = a.symmetric_eigen();
    if eig.eigenvalues.min() < 1e-9 * eig.eigenvalues.max() {
        return None;
    }
    let p = Point3::from(a.try_inverse()? * b);
    rays.iter().all(|(o, d)| (p - o).dot(d) > 0.0).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_point_nearest_to_rays_through_one_point_is_that_point() {
        let x = Point3::new(0.3, -0.2, 4.0);
        let origins = [
            Point3::new(0.0, 0.0, 0.0),
            Point3::new(0.1, 0.0, 0.0),
            Point3::new(0.25, 0.05, 0.1),
        ];
        let rays: Vec<_> = origins.iter().map(|o| (*o, x - o)).collect();
        let p = nearest_to_rays(rays.clone()).expect("a point");
        assert!((p - x).norm() < 1e-9, "{p}");
        // Two of them give the two-view midpoint.
        let (m, _) = midpoint(&rays[0].0, &rays[0].1, &rays[1].0, &rays[1].1).expect("midpoint");
        let p2 = nearest_to_rays(rays[..2].iter().copied()).expect("a point");
        assert!((p2 - m).norm() < 1e-9);
    }

    #[test]
    fn noise_on_one_ray_moves_the_point_less_with_more_rays() {
        // Rays from a baseline of five cameras at x = 0..0.4 towards x; the last ray is bent.
        let x = Point3::new(0.0, 0.0, 5.0);
        let bent = |n: usize| {
            let mut rays: Vec<_> = (0..n)
                .map(|i| {
                    let o = Point3::new(0.1 * i as f64, 0.0, 0.0);
                    (o, x - o)
                })
                .collect();
            let last = rays.len() - 1;
            rays[last].1.x += 0.002 * rays[last].1.z;
            (nearest_to_rays(rays).expect("a point") - x).norm()
        };
        assert!(bent(5) < bent(2), "{} {}", bent(5), bent(2));
    }

    #[test]
    fn parallel_rays_or_a_point_behind_a_camera_place_nothing() {
        let d = Vector3::new(0.0, 0.0, 1.0);
        let parallel = [(Point3::origin(), d), (Point3::new(1.0, 0.0, 0.0), d)];
        assert!(nearest_to_rays(parallel).is_none());
        // Both rays meet at z = −5: behind their origins.
        let x = Point3::new(0.0, 0.0, -5.0);
        let o2 = Point3::new(1.0, 0.0, 0.0);
        let behind = [(Point3::origin(), -(x - Point3::origin())), (o2, -(x - o2))];
        assert!(nearest_to_rays(behind).is_none());
        assert!(nearest_to_rays([(Point3::origin(), d)]).is_none());
    }
}
