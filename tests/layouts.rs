//! Every benchmark layout written from the synthetic world reads back with its ground truth.

mod common;

use std::fmt::Write as _;

use streamrecon::datasets::formats::{depth, pcd};
use streamrecon::datasets::layouts::{self, Layout, LayoutWriter};
use streamrecon::datasets::synth::{SurfaceSampler, SynthWorld, TrajectoryKind};
use streamrecon::source::{BenchmarkKind, Source, SourceItem, SourceOptions, SourceSpec};

fn write(layout: Layout, dir: &std::path::Path, frames: usize) -> SynthWorld {
    let world = SynthWorld::new(common::synth_config(
        TrajectoryKind::Smooth,
        frames,
        64,
        48,
        6,
    ));
    let mut w = LayoutWriter::create(layout, dir, world.intrinsics, "room_smooth").unwrap();
    let mut s = SurfaceSampler::new(0.05, 4);
    for f in world.frames() {
        s.add(&f.view, &f.image, &world.intrinsics);
        w.write_frame(&f).unwrap();
    }
    w.finish(&s.cloud()).unwrap();
    world
}

fn read_all(spec: &SourceSpec) -> Vec<streamrecon::frame::Frame> {
    let mut src = Source::open(
        spec,
        SourceOptions {
            gt_depth: true,
            ..SourceOptions::default()
        },
    )
    .unwrap();
    let mut out = Vec::new();
    while let Some(item) = src.next_item() {
        if let SourceItem::Frame(f) = item.unwrap() {
            out.push(*f);
        }
    }
    out
}

#[test]
fn tum_rgbd_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let world = write(Layout::Tum, dir.path(), 5);
    let spec = SourceSpec::parse(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(
        spec,
        SourceSpec::Benchmark(dir.path().to_path_buf(), BenchmarkKind::TumRgbd)
    );
    let frames = read_all(&spec);
    assert_eq!(frames.len(), 5);
    for (i, f) in world.frames().enumerate() {
        assert_eq!(frames[i].image, f.image);
        let gt = frames[i].gt.as_ref().unwrap();
        let pose = gt.world_from_cam.unwrap();
        assert!((pose.translation.vector - f.view.world_from_cam.translation.vector).norm() < 1e-6);
        // 5000 units per metre: within half a unit.
        for (a, b) in gt.depth.as_ref().unwrap().iter().zip(&f.view.depth) {
            assert!((a - b).abs() <= 0.5 / 5000.0 + 1e-6 || *b > 13.0);
        }
    }
}

#[test]
fn sintel_scene_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let world = write(Layout::Sintel, dir.path(), 4);
    let scene = dir.path().join("training/final/room_smooth");
    let spec = SourceSpec::parse(scene.to_str().unwrap()).unwrap();
    assert_eq!(
        spec,
        SourceSpec::Benchmark(scene.clone(), BenchmarkKind::SintelScene)
    );
    let frames = read_all(&spec);
    assert_eq!(frames.len(), 4);
    let listed = layouts::read_sintel(dir.path(), "room_smooth").unwrap();
    for (i, f) in world.frames().enumerate() {
        assert_eq!(frames[i].image, f.image);
        assert_eq!(
            frames[i].gt.as_ref().unwrap().depth.as_ref().unwrap(),
            &f.view.depth
        );
        if let Some((flow, _)) = &f.flow_fwd {
            assert_eq!(
                &layouts::read_flow_any(listed[i].flow_fwd.as_ref().unwrap()).unwrap(),
                flow
            );
        }
    }
}

#[test]
fn kitti_pairs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let world = write(Layout::Kitti, dir.path(), 4);
    let pairs = layouts::read_kitti_pairs(dir.path()).unwrap();
    assert_eq!(pairs.len(), 3);
    let frames: Vec<_> = world.frames().collect();
    for (k, p) in pairs.iter().enumerate() {
        assert_eq!(image::open(&p.first).unwrap().to_rgb8(), frames[k].image);
        assert_eq!(
            image::open(&p.second).unwrap().to_rgb8(),
            frames[k + 1].image
        );
        let (gt, occ) = frames[k].flow_fwd.as_ref().unwrap();
        let noc = layouts::read_flow_any(p.flow_noc.as_ref().unwrap()).unwrap();
        for (i, o) in occ.iter().enumerate() {
            if *o || frames[k].view.depth[i] <= 0.0 {
                assert!(
                    noc.data[2 * i].is_nan(),
                    "occluded pixels are invalid in flow_noc"
                );
            } else {
                assert!((noc.data[2 * i] - gt.data[2 * i]).abs() <= 0.5 / 64.0 + 1e-4);
            }
        }
    }
}

#[test]
fn long3d_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    write(Layout::Long3d, dir.path(), 9);
    let (frames, cloud) = layouts::read_long3d(dir.path()).unwrap();
    assert_eq!(frames.len(), 3, "10 Hz from 30 fps");
    let direct = pcd::read_pcd(&dir.path().join("dense_cloud_map.pcd")).unwrap();
    assert_eq!(cloud, direct);
    assert!(!cloud.is_empty());
    let spec = SourceSpec::parse(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(
        spec,
        SourceSpec::Benchmark(dir.path().to_path_buf(), BenchmarkKind::Long3d)
    );
    assert_eq!(read_all(&spec).len(), 3);
}

#[test]
fn seven_scenes_folder_is_read_with_poses_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    let world = SynthWorld::new(common::synth_config(TrajectoryKind::Smooth, 3, 64, 48, 2));
    for f in world.frames() {
        let base = dir.path().join(format!("frame-{:06}", f.index));
        f.image
            .save(format!("{}.color.png", base.display()))
            .unwrap();
        depth::write_depth_png(
            std::path::Path::new(&format!("{}.depth.png", base.display())),
            64,
            48,
            &f.view.depth,
        )
        .unwrap();
        let m = f.view.world_from_cam.to_homogeneous();
        let mut text = String::new();
        for r in 0..4 {
            let _ = writeln!(
                text,
                "{} {} {} {}",
                m[(r, 0)],
                m[(r, 1)],
                m[(r, 2)],
                m[(r, 3)]
            );
        }
        std::fs::write(format!("{}.pose.txt", base.display()), text).unwrap();
    }
    let spec = SourceSpec::parse(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(
        spec,
        SourceSpec::Benchmark(dir.path().to_path_buf(), BenchmarkKind::SevenScenes)
    );
    let frames = read_all(&spec);
    assert_eq!(frames.len(), 3);
    for (f, w) in frames.iter().zip(world.frames()) {
        let p = f.gt.as_ref().unwrap().world_from_cam.unwrap();
        assert!((p.translation.vector - w.view.world_from_cam.translation.vector).norm() < 1e-9);
    }
}
