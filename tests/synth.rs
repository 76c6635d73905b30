//! The synthetic world's ground truth is exact and self-consistent, and deterministic.

mod common;

use streamrecon::datasets::native::NativeDataset;
use streamrecon::datasets::synth::{SynthWorld, TrajectoryKind};
use streamrecon::flow::{bilinear1, FlowField};

fn channel(img: &image::RgbImage, c: usize) -> Vec<f32> {
    img.pixels().map(|p| f32::from(p[c])).collect()
}

#[test]
fn warping_next_frame_by_gt_flow_reproduces_the_frame() {
    let world = SynthWorld::new(common::synth_config(
        TrajectoryKind::Handheld,
        6,
        320,
        240,
        3,
    ));
    let frames: Vec<_> = world.frames().collect();
    let (w, h) = (320usize, 240usize);
    let mut worst: f64 = 0.0;
    for pair in frames.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let (flow, occ) = a.flow_fwd.as_ref().unwrap();
        let chans: Vec<Vec<f32>> = (0..3).map(|c| channel(&b.image, c)).collect();
        let (mut sum, mut n) = (0.0f64, 0u64);
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                if occ[i] || a.view.depth[i] <= 0.0 {
                    continue;
                }
                let (u, v) = flow.get(x, y);
                for (c, ch) in chans.iter().enumerate() {
                    let Some(s) = bilinear1(ch, w, h, x as f32 + u, y as f32 + v) else {
                        continue;
                    };
                    sum +=
                        f64::from((s - f32::from(a.image.get_pixel(x as u32, y as u32)[c])).abs());
                    n += 1;
                }
            }
        }
        let mae = sum / n as f64;
        println!(
            "frame {}: photometric MAE after GT warp {mae:.3} grey levels over {n} samples",
            a.index
        );
        worst = worst.max(mae);
    }
    assert!(worst < 3.0, "warp error {worst}");
}

#[test]
fn written_depth_and_poses_reproject_onto_the_written_flow() {
    let dir = tempfile::tempdir().unwrap();
    common::write_sequence(
        dir.path(),
        &common::synth_config(TrajectoryKind::Smooth, 4, 160, 120, 5),
    );
    let ds = NativeDataset::open(dir.path()).unwrap();
    let k = ds.intrinsics;
    let mut worst = 0.0f64;
    for i in 0..ds.len() - 1 {
        let depth = ds.depth(i).unwrap();
        let flow = ds.flow_fwd(i).unwrap();
        let b_from_a = ds.poses[i + 1].world_from_cam.inverse() * ds.poses[i].world_from_cam;
        for y in 0..k.height as usize {
            for x in 0..k.width as usize {
                let z = depth[y * k.width as usize + x];
                if z <= 0.0 {
                    continue;
                }
                let p = b_from_a * k.unproject(x as f64, y as f64, f64::from(z));
                let (u, v) = k.project(&p).unwrap();
                let (fu, fv) = flow.get(x, y);
                let e = (u - x as f64 - f64::from(fu)).hypot(v - y as f64 - f64::from(fv));
                worst = worst.max(e);
            }
        }
    }
    println!("largest reprojection vs GT flow difference: {worst:.2e} px");
    assert!(worst < 0.01, "{worst}");
}

#[test]
fn forward_and_backward_flows_agree_on_visible_pixels() {
    let world = SynthWorld::new(common::synth_config(TrajectoryKind::Smooth, 3, 320, 240, 9));
    let frames: Vec<_> = world.frames().collect();
    let (fwd, occ) = frames[0].flow_fwd.as_ref().unwrap();
    let (bwd, _) = frames[1].flow_bwd.as_ref().unwrap();
    let mut errs = Vec::new();
    for y in 0..240 {
        for x in 0..320 {
            if occ[y * 320 + x] {
                continue;
            }
            let (u, v) = fwd.get(x, y);
            if let Some((bu, bv)) = bwd.sample(x as f32 + u, y as f32 + v) {
                errs.push((u + bu).hypot(v + bv));
            }
        }
    }
    errs.sort_by(f32::total_cmp);
    let med = errs[errs.len() / 2];
    let p95 = errs[errs.len() * 95 / 100];
    println!(
        "fwd+bwd residual: median {med:.4} px, p95 {p95:.4} px over {} pixels",
        errs.len()
    );
    assert!(med < 0.01 && p95 < 0.1, "median {med}, p95 {p95}");
}

#[test]
fn same_seed_gives_same_bytes() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let cfg = common::synth_config(TrajectoryKind::Handheld, 3, 96, 64, 11);
    common::write_sequence(d1.path(), &cfg);
    common::write_sequence(d2.path(), &cfg);
    for f in [
        "rgb/000001.png",
        "depth/000001.npy",
        "flow_fwd/000001.flo",
        "flow_bwd/000002.flo",
        "occ_fwd/000000.png",
        "poses.txt",
        "gt_points.ply",
    ] {
        let a = std::fs::read(d1.path().join(f)).unwrap();
        let b = std::fs::read(d2.path().join(f)).unwrap();
        assert!(a == b, "{f} differs between runs");
    }
}

#[test]
fn skipping_the_flow_changes_nothing_else() {
    let cfg = common::synth_config(TrajectoryKind::Handheld, 4, 96, 64, 3);
    let without = streamrecon::datasets::synth::SynthConfig {
        flow: false,
        ..cfg.clone()
    };
    let (a, b) = (SynthWorld::new(cfg), SynthWorld::new(without));
    let mut n = 0;
    for (fa, fb) in a.frames().zip(b.frames()) {
        assert!(fb.flow_fwd.is_none() && fb.flow_bwd.is_none());
        assert_eq!(fa.flow_fwd.is_some(), fa.index < 3);
        assert_eq!(fa.image.as_raw(), fb.image.as_raw());
        assert_eq!(fa.view.depth, fb.view.depth);
        assert_eq!(fa.view.world_from_cam, fb.view.world_from_cam);
        n += 1;
    }
    assert_eq!(n, 4);
}

#[test]
fn native_layout_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::synth_config(TrajectoryKind::Static, 3, 64, 48, 2);
    common::write_sequence(dir.path(), &cfg);
    let world = SynthWorld::new(cfg);
    let ds = NativeDataset::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 3);
    for (i, f) in world.frames().enumerate() {
        let r = ds.frame(i, true).unwrap();
        assert_eq!(r.image, f.image);
        assert_eq!(
            r.gt.as_ref().unwrap().depth.as_ref().unwrap(),
            &f.view.depth
        );
        if let Some((flow, _)) = &f.flow_fwd {
            let back: FlowField = ds.flow_fwd(i).unwrap();
            assert_eq!(&back, flow);
        }
    }
}

#[test]
fn smooth_and_handheld_cameras_never_whip_round() {
    use nalgebra::Vector3;
    use streamrecon::datasets::synth::Trajectory;
    // The room's free box (where cameras move).
    let (free_min, free_max) = (Vector3::new(-1.6, 1.1, -1.2), Vector3::new(1.6, 1.9, 1.2));
    let mut worst = (0.0f64, 0u64, 0usize);
    for kind in [TrajectoryKind::Smooth, TrajectoryKind::Handheld] {
        for seed in 0..60 {
            let t = Trajectory::new(kind, seed, free_min, free_max);
            let mut prev = t.world_from_cam(0);
            for i in 1..1000 {
                let p = t.world_from_cam(i);
                let turn = (prev.rotation.inverse() * p.rotation).angle().to_degrees();
                if turn > worst.0 {
                    worst = (turn, seed, i);
                }
                prev = p;
            }
        }
    }
    println!(
        "largest turn between frames: {:.2}° (seed {}, frame {})",
        worst.0, worst.1, worst.2
    );
    // A hand-held camera at 30 fps; the old look-at-a-target paths reached 150°.
    assert!(
        worst.0 < 5.0,
        "camera turns {:.1}° in one frame (seed {}, frame {})",
        worst.0,
        worst.1,
        worst.2
    );
}

#[test]
fn camera_degradations_change_the_image_as_a_sensor_would() {
    use streamrecon::datasets::synth::Degrade;
    let d = Degrade::parse("noise=0.01,shot=0.02,blur=2,exposure=0.1,jpeg=70").unwrap();
    assert_eq!((d.jpeg, d.shot, d.blur), (70, 0.02, 2));
    assert!(Degrade::parse("jpeg=0").is_err() && Degrade::parse("jpeg=101").is_err());
    assert!(Degrade::parse("grain=1").unwrap_err().contains("shot"));
    let config = |degrade| streamrecon::datasets::synth::SynthConfig {
        degrade,
        ..common::synth_config(TrajectoryKind::Handheld, 2, 160, 120, 4)
    };
    let image = |degrade| {
        let world = SynthWorld::new(config(degrade));
        let view = world.view(1);
        world.camera_image(1, &view)
    };
    let clean = image(Degrade::default());
    // Shot noise grows with brightness: the error's spread is larger on bright pixels.
    let shot = image(Degrade {
        shot: 0.02,
        ..Degrade::default()
    });
    let spread = |bright: bool| {
        let d: Vec<f32> = clean
            .as_raw()
            .iter()
            .zip(shot.as_raw())
            .filter(|(c, _)| (**c > 180) == bright && (**c < 60) != bright)
            .map(|(&c, &s)| f32::from(s) - f32::from(c))
            .collect();
        (d.iter().map(|v| v * v).sum::<f32>() / d.len().max(1) as f32).sqrt()
    };
    let (dark, bright) = (spread(false), spread(true));
    assert!(bright > 1.3 * dark, "bright {bright}, dark {dark}");
    // JPEG leaves artefacts: close to the clean frame, not equal to it.
    let jpeg = image(Degrade {
        jpeg: 60,
        ..Degrade::default()
    });
    let mad = clean
        .as_raw()
        .iter()
        .zip(jpeg.as_raw())
        .map(|(&a, &b)| f64::from(a.abs_diff(b)))
        .sum::<f64>()
        / clean.as_raw().len() as f64;
    assert!(mad > 0.3 && mad < 12.0, "mean difference {mad}");
    // Deterministic: the same configuration gives the same bytes.
    assert_eq!(
        image(d).as_raw(),
        image(d).as_raw(),
        "same degradations, same bytes"
    );
}

/// A rolling shutter reads each band of rows at its own time: the top band is the scene a
/// moment before the frame's time, the bottom one a moment after, each exactly those rows of a
/// global-shutter render at that time.
#[test]
fn a_rolling_shutter_reads_each_band_of_rows_at_its_time() {
    use streamrecon::datasets::synth::{render, Degrade};
    assert!(Degrade::parse("rolling=1.5").is_err());
    let rolling = 0.8;
    let world = SynthWorld::new(streamrecon::datasets::synth::SynthConfig {
        degrade: Degrade::parse(&format!("rolling={rolling}")).unwrap(),
        ..common::synth_config(TrajectoryKind::Handheld, 4, 160, 128, 2)
    });
    let i = 2;
    let img = world.camera_image(i, &world.view(i));
    let global = SynthWorld::new(common::synth_config(
        TrajectoryKind::Handheld,
        4,
        160,
        128,
        2,
    ));
    let plain = global.camera_image(i, &global.view(i));
    assert_ne!(
        img.as_raw(),
        plain.as_raw(),
        "a moving camera's rows are skewed"
    );
    // 16 bands of 8 rows; band b is read at i + rolling·((b + 0.5)/16 − 0.5).
    let (w, k) = (160usize, world.intrinsics);
    for b in [0u32, 15] {
        let when = i as f64 + rolling * ((f64::from(b) + 0.5) / 16.0 - 0.5);
        let (a, c) = (
            world.world_from_cam(when.floor() as usize),
            world.world_from_cam(when.floor() as usize + 1),
        );
        let at = render(&world.scene, &k, &a.lerp_slerp(&c, when - when.floor()));
        let rows = |img: &image::RgbImage| {
            img.as_raw()[(b as usize * 8) * w * 3..(b as usize * 8 + 8) * w * 3].to_vec()
        };
        // The same rows of a global render at that time, quantised as the camera does.
        let mut expect = image::RgbImage::new(160, 128);
        for (px, c) in expect.pixels_mut().zip(&at.rgb) {
            for ch in 0..3 {
                px[ch] = (c[ch].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        let diff = rows(&img)
            .iter()
            .zip(rows(&expect))
            .map(|(&x, y)| x.abs_diff(y))
            .max()
            .unwrap();
        assert!(diff <= 1, "band {b}: largest difference {diff}");
    }
}

/// Photographs become the scene's textures: with every material a red photo, every surface is
/// red (shaded); a photo that does not read is refused by name before anything is rendered.
#[test]
fn photographs_texture_the_scene_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let red = dir.path().join("red.png");
    image::RgbImage::from_pixel(64, 48, image::Rgb([200, 30, 20]))
        .save(&red)
        .unwrap();
    let world = SynthWorld::new(streamrecon::datasets::synth::SynthConfig {
        photos: vec![red.clone(); 10],
        ..common::synth_config(TrajectoryKind::Smooth, 2, 80, 60, 3)
    });
    let img = world.camera_image(0, &world.view(0));
    assert!(
        img.pixels().all(|p| p[0] > 2 * p[1] && p[0] > 2 * p[2]),
        "every surface in the photo's colour"
    );
    let plain = SynthWorld::new(common::synth_config(TrajectoryKind::Smooth, 2, 80, 60, 3));
    let procedural = plain.camera_image(0, &plain.view(0));
    assert!(
        procedural.pixels().any(|p| p[0] < p[1]),
        "procedural textures are not all red"
    );
    let missing = dir.path().join("missing.jpg");
    let o = common::bin()
        .args(["synth", "--frames", "2", "--size", "80x60", "--out"])
        .arg(dir.path().join("seq"))
        .arg("--photos")
        .arg(&red)
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing.jpg"), "{err}");
    assert!(!dir.path().join("seq").exists(), "nothing written");
}

/// `speed` moves the camera further a frame along the same path: frame i at speed 2 is frame
/// 2i at speed 1, and a half-way frame lies between its neighbours.
#[test]
fn speed_moves_along_the_same_path() {
    let config = |speed| streamrecon::datasets::synth::SynthConfig {
        speed,
        ..common::synth_config(TrajectoryKind::Handheld, 10, 80, 60, 5)
    };
    let (slow, fast, half) = (
        SynthWorld::new(config(1.0)),
        SynthWorld::new(config(2.0)),
        SynthWorld::new(config(0.5)),
    );
    for i in 0..5 {
        assert_eq!(fast.world_from_cam(i), slow.world_from_cam(2 * i));
    }
    let (a, b, m) = (
        slow.world_from_cam(3),
        slow.world_from_cam(4),
        half.world_from_cam(7),
    );
    let between = (m.translation.vector - a.translation.vector).norm()
        + (b.translation.vector - m.translation.vector).norm();
    assert!(between <= (b.translation.vector - a.translation.vector).norm() + 1e-9);
}

/// A lens distorts the frames as OpenCV's model says: undistorted with the calibration the world
/// writes (OpenCV's `initUndistortRectifyMap` and `remap`, as `--intrinsics-file` does), a barrel
/// lens's frame is the pinhole camera's, up to resampling.
#[test]
fn a_lens_distorts_as_its_calibration_says() {
    use streamrecon::datasets::synth::Degrade;
    use streamrecon::pipeline::calibration::Calibration;
    assert!(Degrade::parse("lens=0.9").is_err());
    let config = |lens: &str| streamrecon::datasets::synth::SynthConfig {
        degrade: Degrade::parse(lens).unwrap(),
        ..common::synth_config(TrajectoryKind::Smooth, 2, 320, 240, 5)
    };
    let pinhole = SynthWorld::new(config(""));
    assert!(pinhole.calibration_yaml().is_none());
    let lens = SynthWorld::new(config("lens=-0.25"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibration.yml");
    std::fs::write(&path, lens.calibration_yaml().unwrap()).unwrap();
    let mut calibration = Calibration::read(&path).unwrap();
    let (w, h) = (320usize, 240usize);
    let want = pinhole.camera_image(1, &pinhole.view(1));
    let distorted = lens.camera_image(1, &lens.view(1));
    let back = calibration.undistort(&distorted).unwrap();
    let diff = |a: &image::RgbImage, b: &image::RgbImage| {
        // Mean absolute difference inside a margin (the undistorted frame's corners are black).
        let (mut sum, mut n) = (0u64, 0u64);
        for y in h / 8..h - h / 8 {
            for x in w / 8..w - w / 8 {
                for c in 0..3 {
                    sum += u64::from(
                        a.get_pixel(x as u32, y as u32)[c]
                            .abs_diff(b.get_pixel(x as u32, y as u32)[c]),
                    );
                    n += 1;
                }
            }
        }
        sum as f64 / n as f64
    };
    // Compared blurred: the undistorted frame is the scene resampled twice (through the lens,
    // then back), softer than the pinhole frame; the geometry is the test.
    let soft = |i: &image::RgbImage| image::imageops::blur(i, 2.0);
    let (want, distorted, back) = (soft(&want), soft(&distorted), soft(&back));
    let (bent, straightened) = (diff(&distorted, &want), diff(&back, &want));
    println!("mean difference from the pinhole frame: distorted {bent:.2}, undistorted {straightened:.2}");
    assert!(bent > 5.0 * straightened, "{bent} vs {straightened}");
    assert!(straightened < 2.0, "{straightened}");
}
