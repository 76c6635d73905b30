//! Round trips and malformed-input handling of every file format.

use std::path::Path;

use nalgebra::{Translation3, UnitQuaternion, Vector3};
use streamrecon::cloud::PointCloud;
use streamrecon::datasets::formats::pcd::{lzf_decompress, pcd_from_bytes, pcd_to_bytes, PcdData};
use streamrecon::datasets::formats::ply::{ply_from_bytes, ply_to_bytes};
use streamrecon::datasets::formats::tum::{tum_from_str, tum_to_string, StampedPose};
use streamrecon::datasets::formats::{depth, flo, kitti_flow};
use streamrecon::flow::FlowField;
use streamrecon::frame::Pose;

fn field(w: usize, h: usize) -> FlowField {
    let mut f = FlowField::zeros(w, h);
    for (i, v) in f.data.iter_mut().enumerate() {
        *v = ((i as f32) * 0.37).sin() * 40.0;
    }
    f
}

const P: &str = "test-input";

#[test]
fn flo_round_trips_exactly() {
    let f = field(13, 7);
    let back = flo::flo_from_bytes(&flo::flo_to_bytes(&f), Path::new(P)).unwrap();
    assert_eq!(back, f);
}

#[test]
fn flo_rejects_bad_input() {
    let good = flo::flo_to_bytes(&field(4, 3));
    let p = Path::new(P);
    assert!(
        flo::flo_from_bytes(&good[..8], p).is_err(),
        "truncated header"
    );
    assert!(
        flo::flo_from_bytes(&good[..good.len() - 1], p).is_err(),
        "truncated data"
    );
    let mut bad = good.clone();
    bad[0] ^= 1;
    let e = flo::flo_from_bytes(&bad, p).unwrap_err().to_string();
    assert!(e.contains("magic") && e.ends_with(P), "{e}");
    let mut nan = good.clone();
    nan[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(flo::flo_from_bytes(&nan, p).is_err(), "NaN");
    let mut huge = good;
    huge[4..8].copy_from_slice(&i32::MAX.to_le_bytes());
    assert!(flo::flo_from_bytes(&huge, p).is_err(), "absurd size");
}

#[test]
fn flo_is_read_identically_by_opencv() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.flo");
    let f = field(31, 17);
    flo::write_flo(&path, &f).unwrap();
    let m = opencv::video::read_optical_flow(path.to_str().unwrap()).unwrap();
    let back = streamrecon::flow::dis::flow_from_mat(&m).unwrap();
    assert_eq!(back, f);
}

#[test]
fn kitti_png_round_trips_within_quantisation() {
    let f = field(20, 9);
    let valid: Vec<bool> = (0..180).map(|i| i % 7 != 0).collect();
    let k = kitti_flow::kitti_flow_from_bytes(
        &kitti_flow::kitti_flow_to_bytes(&f, Some(&valid)),
        Path::new(P),
    )
    .unwrap();
    assert_eq!(k.valid, valid);
    for (i, &ok) in valid.iter().enumerate() {
        if ok {
            for c in 0..2 {
                assert!((k.flow.data[2 * i + c] - f.data[2 * i + c]).abs() <= 0.5 / 64.0 + 1e-4);
            }
        }
    }
    // A second round trip is exact.
    let again = kitti_flow::kitti_flow_from_bytes(
        &kitti_flow::kitti_flow_to_bytes(&k.flow, Some(&k.valid)),
        Path::new(P),
    )
    .unwrap();
    assert_eq!(again, k);
    assert!(kitti_flow::kitti_flow_from_bytes(b"\x89PNG garbage", Path::new(P)).is_err());
}

fn cloud() -> PointCloud {
    PointCloud {
        points: (0..50)
            .map(|i| [i as f32 * 0.5, (i as f32).sin(), -(i as f32)])
            .collect(),
        colors: Some((0..50).map(|i| [i as u8, 255 - i as u8, 7]).collect()),
        confidence: Some((0..50).map(|i| i as f32 / 50.0).collect()),
        normals: None,
    }
}

#[test]
fn ply_round_trips_and_rejects_truncation() {
    let c = cloud();
    let bytes = ply_to_bytes(&c);
    assert_eq!(ply_from_bytes(&bytes, Path::new(P)).unwrap(), c);
    assert!(ply_from_bytes(&bytes[..bytes.len() - 3], Path::new(P)).is_err());
    assert!(ply_from_bytes(
        b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nend_header\n1\n",
        Path::new(P)
    )
    .is_err());
    let ascii = b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\nend_header\n1 2 3\n4 5 6\n";
    assert_eq!(
        ply_from_bytes(ascii, Path::new(P)).unwrap().points,
        vec![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    );
}

#[test]
fn pcd_round_trips_in_every_encoding() {
    let mut c = cloud();
    c.confidence = None;
    for kind in [PcdData::Ascii, PcdData::Binary, PcdData::BinaryCompressed] {
        let back = pcd_from_bytes(&pcd_to_bytes(&c, kind), Path::new(P)).unwrap();
        assert_eq!(back.colors, c.colors, "{kind:?}");
        for (a, b) in back.points.iter().zip(&c.points) {
            for k in 0..3 {
                assert!(
                    (a[k] - b[k]).abs() <= 1e-6 * b[k].abs().max(1.0),
                    "{kind:?}"
                );
            }
        }
        let bytes = pcd_to_bytes(&c, kind);
        assert!(
            pcd_from_bytes(&bytes[..bytes.len() - 10], Path::new(P)).is_err(),
            "{kind:?} truncated"
        );
    }
    assert!(pcd_from_bytes(b"VERSION 0.7\nFIELDS x y\n", Path::new(P)).is_err());
}

#[test]
fn lzf_decodes_back_references() {
    // "abcabcabc": literal run "abc" (ctrl 2), then a back-reference of length 6 at distance 3:
    // ctrl = ((6 - 2) << 5) | ((3 - 1) >> 8), then the low offset byte (3 - 1).
    let enc = [2u8, b'a', b'b', b'c', (4 << 5) as u8, 2];
    assert_eq!(lzf_decompress(&enc, 9).unwrap(), b"abcabcabc");
    assert!(lzf_decompress(&enc, 10).is_none(), "size mismatch");
    assert!(
        lzf_decompress(&[(4 << 5) as u8, 200], 9).is_none(),
        "reference before start"
    );
}

#[test]
fn tum_round_trips_and_rejects_bad_lines() {
    let poses: Vec<StampedPose> = (0..5)
        .map(|i| StampedPose {
            timestamp: f64::from(i) / 30.0,
            world_from_cam: Pose::from_parts(
                Translation3::new(f64::from(i), 0.5, -1.0),
                UnitQuaternion::from_scaled_axis(Vector3::new(0.1, -0.2 * f64::from(i), 0.3)),
            ),
        })
        .collect();
    let back = tum_from_str(&tum_to_string(&poses), Path::new(P)).unwrap();
    for (a, b) in back.iter().zip(&poses) {
        assert!((a.timestamp - b.timestamp).abs() < 1e-6);
        assert!(
            (a.world_from_cam.translation.vector - b.world_from_cam.translation.vector).norm()
                < 1e-8
        );
        assert!(
            a.world_from_cam
                .rotation
                .angle_to(&b.world_from_cam.rotation)
                < 1e-8
        );
    }
    assert!(tum_from_str("0 1 2 3\n", Path::new(P)).is_err());
    assert!(tum_from_str("0 1 2 3 0 0 0 x\n", Path::new(P)).is_err());
    assert!(
        tum_from_str("0 1 2 3 0 0 0 0\n", Path::new(P)).is_err(),
        "zero quaternion"
    );
    assert!(tum_from_str("# comment\n\n", Path::new(P))
        .unwrap()
        .is_empty());
}

#[test]
fn depth_png_and_npy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d: Vec<f32> = (0..60)
        .map(|i| {
            if i % 9 == 0 {
                0.0
            } else {
                0.5 + i as f32 * 0.013
            }
        })
        .collect();
    let p = dir.path().join("d.npy");
    depth::write_depth_npy(&p, 10, 6, &d).unwrap();
    let back = depth::read_depth_npy(&p).unwrap();
    assert_eq!((back.width, back.height), (10, 6));
    assert_eq!(back.data, d);
    let p = dir.path().join("d.png");
    depth::write_depth_png(&p, 10, 6, &d).unwrap();
    let back = depth::read_depth_png(&p, 1000.0).unwrap();
    for (a, b) in back.data.iter().zip(&d) {
        assert!((a - b).abs() <= 0.0005 + 1e-6);
    }
}
