//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use streamrecon::datasets::native::{NativeWriter, SequenceMeta};
use streamrecon::datasets::synth::{
    SceneKind, SurfaceSampler, SynthConfig, SynthWorld, TrajectoryKind,
};

pub fn synth_config(
    trajectory: TrajectoryKind,
    frames: usize,
    width: u32,
    height: u32,
    seed: u64,
) -> SynthConfig {
    SynthConfig {
        scene: SceneKind::Room,
        trajectory,
        frames,
        width,
        height,
        seed,
        ..SynthConfig::default()
    }
}

/// Writes a native-layout sequence into `dir`.
pub fn write_sequence(dir: &Path, config: &SynthConfig) {
    let world = SynthWorld::new(config.clone());
    let mut w = NativeWriter::create(dir, world.intrinsics).expect("create dataset");
    let mut sampler = SurfaceSampler::new(0.05, 8);
    for f in world.frames() {
        sampler.add(&f.view, &f.image, &world.intrinsics);
        w.write_frame(&f).expect("write frame");
    }
    let meta = SequenceMeta {
        generator: "test".into(),
        frames: config.frames,
        fps: config.fps,
        jump_frames: world.trajectory.jump_frames(config.frames),
        config: serde_json::to_value(config).expect("json"),
    };
    w.finish(&sampler.cloud(), &meta).expect("finish dataset");
}

pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_streamrecon"))
}
