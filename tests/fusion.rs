//! Fusion: bounded memory, outlier removal, normals.

use streamrecon::cloud::PointCloud;
use streamrecon::frame::{Intrinsics, Pose};
use streamrecon::fusion::{
    remove_statistical_outliers, with_normals, without_outliers_with_normals, Fusion, FusionConfig,
};
use streamrecon::geometry::{FrameGeometry, GeometryStats};

fn plane_frame(index: u64, z: f32, k: &Intrinsics) -> FrameGeometry {
    let n = (k.width * k.height) as usize;
    FrameGeometry {
        index,
        timestamp: index as f64,
        world_from_cam: Pose::translation(index as f64 * 0.5, 0.0, 0.0),
        intrinsics: *k,
        depth: Some(vec![z; n]),
        confidence: Some(vec![1.0; n]),
        stats: GeometryStats::default(),
        memory: None,
    }
}

#[test]
fn the_cloud_stays_under_its_cap_on_an_endless_stream() {
    let k = Intrinsics::from_hfov(64, 48, 60.0);
    let mut fusion = Fusion::new(FusionConfig {
        voxel: 0.01,
        max_points: 2000,
        pixel_stride: 1,
        ..FusionConfig::default()
    });
    let img = image::RgbImage::new(64, 48);
    for i in 0..200 {
        fusion.integrate(&plane_frame(i, 2.0, &k), &img);
        assert!(fusion.len() <= 2000, "frame {i}: {} voxels", fusion.len());
    }
    assert!(fusion.evicted() > 0);
}

#[test]
fn the_voxel_table_never_grows() {
    // Frames add a few percent of the cap, as a 640x480 frame does to the default; evictions
    // then go on for hundreds of frames.
    let k = Intrinsics::from_hfov(64, 48, 60.0);
    let mut fusion = Fusion::new(FusionConfig {
        voxel: 0.01,
        max_points: 8000,
        pixel_stride: 2,
        ..FusionConfig::default()
    });
    let img = image::RgbImage::new(64, 48);
    let mut sized: Option<usize> = None;
    for i in 0..600 {
        fusion.integrate(&plane_frame(i, 2.0, &k), &img);
        let c = *sized.get_or_insert(fusion.table_bytes());
        assert_eq!(fusion.table_bytes(), c, "frame {i}: the table grew");
    }
    assert!(fusion.evicted() > 50 * 800, "{} evicted", fusion.evicted());
    // (8000 + 768 voxels)·2 of room, rounded up to a power of two: 32768 buckets of 44 bytes and
    // a control byte.
    assert!(sized.unwrap() < 32768 * 46, "{sized:?} bytes");
}

#[test]
fn a_cap_beyond_memory_leaves_the_table_to_grow() {
    let k = Intrinsics::from_hfov(64, 48, 60.0);
    for max_points in [usize::MAX, usize::MAX / 64] {
        let mut fusion = Fusion::new(FusionConfig {
            max_points,
            ..FusionConfig::default()
        });
        let img = image::RgbImage::new(64, 48);
        for i in 0..3 {
            fusion.integrate(&plane_frame(i, 2.0, &k), &img);
        }
        assert!(!fusion.is_empty() && fusion.evicted() == 0);
    }
}

#[test]
fn outliers_are_removed_and_plane_normals_found() {
    let mut pts: Vec<[f32; 3]> = (0..400)
        .map(|i| [(i % 20) as f32 * 0.01, (i / 20) as f32 * 0.01, 0.0])
        .collect();
    pts.push([5.0, 5.0, 5.0]);
    let c = PointCloud::from_points(pts);
    let kept = remove_statistical_outliers(&c, 8, 2.0);
    assert_eq!(kept.len(), 400);
    let with = with_normals(kept, 8);
    for n in with.normals.as_ref().unwrap() {
        assert!(n[2].abs() > 0.999, "{n:?}");
    }
    // The final cloud's one-query version keeps the same points with the same normals.
    let one = without_outliers_with_normals(&c, 8, 2.0);
    assert_eq!(one.points, with.points);
    for (a, b) in one.normals.unwrap().iter().zip(with.normals.unwrap()) {
        let dot: f32 = (0..3).map(|i| a[i] * b[i]).sum();
        assert!(dot.abs() > 0.999, "{a:?} vs {b:?}");
    }
}

#[test]
fn the_final_cloud_matches_outlier_removal_then_normals_on_a_curved_surface() {
    // A noisy sphere cap with scattered outliers: same points kept, normals within 3°.
    let mut pts: Vec<[f32; 3]> = Vec::new();
    for i in 0..60 {
        for j in 0..60 {
            let (a, b) = (i as f32 * 0.02 - 0.6, j as f32 * 0.02 - 0.6);
            let z = (1.0 - a * a - b * b).sqrt();
            let wobble = 0.002 * ((i * 7 + j * 13) % 5) as f32;
            pts.push([a, b, z + wobble]);
        }
    }
    for i in 0..30 {
        let t = i as f32;
        pts.push([2.0 + t.sin(), -2.0 + t.cos(), 3.0 + 0.1 * t]);
    }
    let c = PointCloud::from_points(pts);
    let two = with_normals(remove_statistical_outliers(&c, 12, 2.0), 12);
    let one = without_outliers_with_normals(&c, 12, 2.0);
    assert_eq!(one.points, two.points);
    assert!(
        one.len() >= 3600 && one.len() < c.len(),
        "{} kept",
        one.len()
    );
    for (a, b) in one.normals.unwrap().iter().zip(two.normals.unwrap()) {
        let dot: f32 = (0..3).map(|i| a[i] * b[i]).sum();
        assert!(dot.abs() > 3f32.to_radians().cos(), "{a:?} vs {b:?}");
    }
}
