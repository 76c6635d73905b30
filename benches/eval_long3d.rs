//! Accuracy + completeness (with normal consistency) on two clouds of N points each — two k-d
//! trees and 2N nearest-neighbour queries — and the whole Long3D protocol on smaller clouds.
//!
//! `cargo bench --bench eval_long3d [-- N]` (default 2,000,000).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use streamrecon::cloud::PointCloud;
use streamrecon::eval::long3d::{accuracy_completeness, evaluate, Long3dConfig};

fn surface_points(n: usize, seed: u64, offset: f64) -> Vec<[f64; 3]> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random_range(0.0..20.0), rng.random_range(0.0..5.0));
            // ±1 mm noise, like a scan (exactly planar coordinates degenerate the k-d splits).
            let e = rng.random_range(-0.001..0.001);
            match rng.random_range(0..3) {
                0 => [u, v, 0.1 * (u * 0.7).sin() + offset + e],
                1 => [u, offset + e, v],
                _ => [offset + e, u * 0.25, v],
            }
        })
        .collect()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let pred = surface_points(n, 1, 0.01);
    let gt = surface_points(n, 2, 0.0);
    let normals = vec![[0.0, 0.0, 1.0]; n];
    let t = Instant::now();
    let tree = streamrecon::eval::long3d::tree(&gt).expect("tree");
    println!("k-d tree of {n} points: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut s = 0.0;
    for p in pred.iter().take(200_000) {
        s += tree
            .query(p)
            .nearest_one::<kiddo::SquaredEuclidean<f64>>()
            .execute()
            .distance;
    }
    println!(
        "200k nearest-one queries, one thread: {:.2} s ({s:.1})",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let r = tree
        .query_batch(&pred[..200_000])
        .nearest_one::<kiddo::SquaredEuclidean<f64>>()
        .execute();
    println!(
        "200k nearest-one queries, batch API: {:.2} s ({})",
        t.elapsed().as_secs_f64(),
        r.len()
    );
    let t = Instant::now();
    let m = accuracy_completeness(&pred, &normals, &gt, &normals).expect("metrics");
    println!(
        "Acc + Comp + NC on {n} x {n} points: {:.2} s (Acc {:.4}, Comp {:.4})",
        t.elapsed().as_secs_f64(),
        m.Acc,
        m.Comp
    );
    let small = n.min(300_000);
    let to_cloud = |p: &[[f64; 3]]| {
        PointCloud::from_points(
            p.iter()
                .map(|q| [q[0] as f32, q[1] as f32, q[2] as f32])
                .collect(),
        )
    };
    let cfg = Long3dConfig {
        cam_to_lidar: std::array::from_fn(|r| {
            std::array::from_fn(|c| if r == c { 1.0 } else { 0.0 })
        }),
        scale_init: 1.0,
        ..Long3dConfig::default()
    };
    let t = Instant::now();
    let r = evaluate(&to_cloud(&pred[..small]), &to_cloud(&gt[..small]), &cfg).expect("protocol");
    println!(
        "whole protocol on {small} + {small} points: {:.2} s ({} evaluated, ICP {} iterations, Acc {:.4})",
        t.elapsed().as_secs_f64(),
        r.points_evaluated,
        r.icp_iterations,
        r.metrics.Acc
    );
}
