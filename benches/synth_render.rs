//! Synthetic world speed: frames/s rendering every ground truth (RGB, depth, forward/backward flow,
//! occlusion) at 640×480, and frames/s writing the native layout to disk, with RSS at start and end.
//!
//! `cargo bench --bench synth_render [-- FRAMES]` (default 200).

use std::time::Instant;

use streamrecon::datasets::native::NativeWriter;
use streamrecon::datasets::synth::{SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::stats::rss_mib;

fn breakdown() {
    let t = Instant::now();
    let world = SynthWorld::new(SynthConfig {
        trajectory: TrajectoryKind::Handheld,
        frames: 20,
        ..SynthConfig::default()
    });
    let setup = t.elapsed().as_secs_f64();
    let (mut tv, mut tc, mut tf) = (0.0, 0.0, 0.0);
    let mut prev = None;
    for i in 0..20 {
        let t = Instant::now();
        let v = world.view(i);
        tv += t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(world.camera_image(i, &v));
        tc += t.elapsed().as_secs_f64();
        if let Some(p) = &prev {
            let t = Instant::now();
            std::hint::black_box(streamrecon::datasets::synth::flow_between(
                p,
                &v,
                &world.intrinsics,
            ));
            tf += t.elapsed().as_secs_f64();
        }
        prev = Some(v);
    }
    println!(
        "scene setup (textures) {:.0} ms; per frame: view {:.1} ms, camera image {:.1} ms, one flow {:.1} ms",
        setup * 1000.0,
        tv * 50.0,
        tc * 50.0,
        tf * 1000.0 / 19.0
    );
}

fn main() {
    breakdown();
    let frames: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    for (scene, traj) in [
        (SceneKind::Room, TrajectoryKind::Handheld),
        (SceneKind::Outdoor, TrajectoryKind::Smooth),
    ] {
        let world = SynthWorld::new(SynthConfig {
            scene,
            trajectory: traj,
            frames,
            ..SynthConfig::default()
        });
        let t = Instant::now();
        let mut n = 0;
        for f in world.frames() {
            std::hint::black_box(&f.flow_fwd);
            n += 1;
        }
        let dt = t.elapsed().as_secs_f64();
        println!("render {scene:?}/{traj:?} 640x480, all GT in memory: {n} frames in {dt:.2} s = {:.1} frames/s", n as f64 / dt);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let world = SynthWorld::new(SynthConfig {
        trajectory: TrajectoryKind::Loop,
        frames,
        ..SynthConfig::default()
    });
    let mut w = NativeWriter::create(dir.path(), world.intrinsics).expect("writer");
    let rss0 = rss_mib();
    let t = Instant::now();
    let mut rss_mid = 0.0;
    for f in world.frames() {
        w.write_frame(&f).expect("write");
        if f.index == frames / 10 {
            rss_mid = rss_mib();
        }
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "render + write native layout: {frames} frames in {dt:.2} s = {:.1} frames/s; RSS {rss0:.0} MiB at start, {rss_mid:.0} MiB at frame {}, {:.0} MiB at the end",
        frames as f64 / dt,
        frames / 10,
        rss_mib()
    );
}
