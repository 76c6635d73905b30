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

#[test]
fn each_voxel_is_the_confidence_weighted_mean_of_its_points() {
    // A tilted plane, varying confidence and colour, voxels far larger than a pixel's footprint
    // (runs of neighbouring pixels share one), over two frames seen from two places.
    let k = Intrinsics::from_hfov(40, 30, 60.0);
    let mut fusion = Fusion::new(FusionConfig {
        voxel: 0.2,
        pixel_stride: 1,
        min_confidence: 0.0,
        ..FusionConfig::default()
    });
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    });
    let mut sums: std::collections::HashMap<[i32; 3], ([f64; 3], [f64; 3], f64)> =
        std::collections::HashMap::new();
    for i in 0..2 {
        let mut g = plane_frame(i, 2.0, &k);
        let (w, h) = (40usize, 30usize);
        g.depth = Some(
            (0..w * h)
                .map(|p| 1.5 + 0.02 * (p % w) as f32 + 0.01 * (p / w) as f32)
                .collect(),
        );
        g.confidence = Some(
            (0..w * h)
                .map(|p| 0.2 + 0.1 * ((p * 7) % 9) as f32)
                .collect(),
        );
        let conf = g.confidence.clone().unwrap_or_default();
        let pts = fusion.integrate(&g, &img);
        assert_eq!(pts.points.len(), w * h);
        for ((p, c), &wt) in pts.points.iter().zip(&pts.colors).zip(&conf) {
            let key = p.map(|v| (v * (1.0 / 0.2f32)).floor() as i32);
            let e = sums.entry(key).or_default();
            for d in 0..3 {
                e.0[d] += f64::from(p[d] * wt);
                e.1[d] += f64::from(c[d]) * f64::from(wt);
            }
            e.2 += f64::from(wt);
        }
    }
    let cloud = fusion.cloud();
    let mut keys: Vec<_> = sums.keys().copied().collect();
    keys.sort_unstable();
    assert_eq!(cloud.points.len(), keys.len());
    assert!(
        keys.len() < 40 * 30 / 4,
        "{} voxels: runs too short to test",
        keys.len()
    );
    let (colors, weights) = (
        cloud.colors.unwrap_or_default(),
        cloud.confidence.unwrap_or_default(),
    );
    for (i, key) in keys.iter().enumerate() {
        let (p, c, wt) = sums[key];
        for d in 0..3 {
            let want = p[d] / wt;
            assert!(
                (f64::from(cloud.points[i][d]) - want).abs() < 1e-5,
                "{key:?}: {:?} vs {want}",
                cloud.points[i]
            );
            assert!(
                (f64::from(colors[i][d]) - c[d] / wt).abs() <= 0.5 + 1e-3,
                "{key:?} colour"
            );
        }
        assert!(
            (f64::from(weights[i]) - wt).abs() < 1e-4 * wt,
            "{key:?} weight"
        );
    }
}

/// A cloud saved with a snapshot and taken back by a resumed run goes on as if never stopped:
/// the same points after the same later frames; a save from another frame, with another voxel
/// edge, or cut short is refused with the reason.
#[test]
fn a_saved_cloud_resumes_where_it_stopped() {
    let k = Intrinsics::from_hfov(64, 48, 60.0);
    let config = FusionConfig {
        voxel: 0.01,
        max_points: 3000,
        pixel_stride: 1,
        ..FusionConfig::default()
    };
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut whole = Fusion::new(config.clone());
    for i in 0..10 {
        whole.integrate(&plane_frame(i, 2.0 + i as f32 * 0.01, &k), &img);
    }
    let saved = whole.to_bytes(10);
    for i in 10..20 {
        whole.integrate(&plane_frame(i, 2.0 + i as f32 * 0.01, &k), &img);
    }
    let mut resumed = Fusion::new(config.clone());
    assert!(resumed.restore(&saved, 10).unwrap() > 0);
    for i in 10..20 {
        resumed.integrate(&plane_frame(i, 2.0 + i as f32 * 0.01, &k), &img);
    }
    let (a, b) = (whole.cloud(), resumed.cloud());
    assert_eq!(a.points, b.points);
    assert_eq!(a.colors, b.colors);
    assert_eq!(whole.evicted(), resumed.evicted());
    let mut other = Fusion::new(config.clone());
    assert!(other.restore(&saved, 11).unwrap_err().contains("not 11"));
    assert!(other
        .restore(&saved[..saved.len() - 3], 10)
        .unwrap_err()
        .contains("bytes"));
    assert!(other.restore(b"junk", 10).is_err());
    let mut coarser = Fusion::new(FusionConfig {
        voxel: 0.02,
        ..config
    });
    assert!(coarser
        .restore(&saved, 10)
        .unwrap_err()
        .contains("voxel edge"));
}
