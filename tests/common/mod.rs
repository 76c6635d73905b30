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

/// A synthetic room sequence (see [`synth_config`]) without flow ground truth written to `dir`;
/// returns `dir`.
pub fn synth_sequence(
    dir: &Path,
    trajectory: TrajectoryKind,
    frames: usize,
    width: u32,
    height: u32,
    seed: u64,
) -> std::path::PathBuf {
    // No flow ground truth: it is most of a sequence's bytes (a 600-frame 320×240 sequence is
    // ~1 GB with it) and only the flow tests read it; CI's disk is shared.
    let config = SynthConfig {
        flow: false,
        ..synth_config(trajectory, frames, width, height, seed)
    };
    write_sequence(dir, &config);
    dir.to_path_buf()
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
        jump_frames: world.jump_frames(),
        config: serde_json::to_value(config).expect("json"),
    };
    w.finish(&sampler.cloud(), &meta).expect("finish dataset");
}

pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_streamrecon"))
}

/// Every key of a `checkpoint_keys.json` fixture (the `module.` prefix of DataParallel checkpoints
/// removed) as a zero-stride tensor of its shape, and the file's `num_entries`.
pub fn checkpoint_shapes(
    path: &Path,
) -> (
    std::collections::BTreeMap<String, candle_core::Tensor>,
    usize,
) {
    use candle_core::{DType, Device, Tensor};
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let zero = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    let map = v["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let shape: Vec<usize> = s
                .as_array()
                .or_else(|| s["shape"].as_array())
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let key = k.strip_prefix("module.").unwrap_or(k).to_string();
            (key, zero.broadcast_as(shape).unwrap())
        })
        .collect();
    (map, v["num_entries"].as_u64().unwrap() as usize)
}

/// A real 16×16 PNG whose header is rewritten to declare `w × h` (a decompression-bomb shape:
/// valid chunks, a size far beyond its data).
pub fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(16, 16)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    // IHDR data sits at bytes 16..29, its CRC (over type and data) at 29..33.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let mut crc = 0xFFFF_FFFFu32;
    for &b in &png[12..29] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                0xEDB8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    png[29..33].copy_from_slice(&(!crc).to_be_bytes());
    png
}

/// max|ours − reference| / max|reference| (infinite when a value is NaN).
pub fn relative_error(ours: &candle_core::Tensor, reference: &candle_core::Tensor) -> f64 {
    use candle_core::DType;
    assert_eq!(ours.dims(), reference.dims());
    let flat = |t: &candle_core::Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (o, r) = (flat(ours), flat(reference));
    let max_ref: f64 = r.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    let d: f64 = (o - r)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    if d.is_nan() {
        f64::INFINITY
    } else {
        d / max_ref.max(1e-30)
    }
}

/// Compares every tensor of a reference fixture's `io` (but `skip`) with the port's output of
/// the same name, within `tolerance(name)` of max|ref|; prints the worst ratio per tensor family
/// (`iter<k>.delta_flow` as one) and fails listing every tensor out of tolerance or missing.
pub fn assert_matches_fixture(
    set: &str,
    io: &std::collections::HashMap<String, candle_core::Tensor>,
    ours: &std::collections::HashMap<String, candle_core::Tensor>,
    skip: &[&str],
    tolerance: impl Fn(&str) -> f64,
) {
    let mut worst = std::collections::BTreeMap::<String, f64>::new();
    let mut failures = Vec::new();
    let mut names: Vec<&String> = io.keys().filter(|k| !skip.contains(&k.as_str())).collect();
    names.sort();
    for name in names {
        let Some(t) = ours.get(name.as_str()) else {
            failures.push(format!("{name}: no such output in the port"));
            continue;
        };
        let r = relative_error(t, &io[name]);
        let family = if name.ends_with(".delta_flow") {
            "iter<k>.delta_flow".to_string()
        } else {
            name.clone()
        };
        let w = worst.entry(family).or_insert(0.0);
        *w = w.max(r);
        if r > tolerance(name) {
            failures.push(format!("{name}: {r:.3e}"));
        }
    }
    println!("{set}: worst max|rust − ref| / max|ref| per tensor:");
    for (k, v) in &worst {
        println!("  {k:<32} {v:.3e}");
    }
    assert!(failures.is_empty(), "{set}:\n{}", failures.join("\n"));
}

/// Frame `i` of a small moving test pattern (`w` × `h`), for the flow engines' tests.
pub fn pattern_frame(i: u64, w: u32, h: u32) -> streamrecon::frame::Frame {
    streamrecon::frame::Frame {
        index: i,
        source_index: i,
        timestamp: i as f64,
        image: image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 7 + y * 3 + i as u32 * 2) % 256) as u8,
                (y * 4 % 256) as u8,
                (x * 2 % 256) as u8,
            ])
        }),
        intrinsics: None,
        gt: None,
    }
}

/// A windowed flow engine on streams of one and two frames (`w` × `h`): nothing for one, the
/// one pair at the end for two.
pub fn assert_short_streams(engine: &mut dyn streamrecon::flow::FlowEngine, w: u32, h: u32) {
    engine.reset();
    assert!(engine.push(&pattern_frame(0, w, h)).unwrap().is_empty());
    assert!(engine.flush().unwrap().is_empty());
    engine.reset();
    engine.push(&pattern_frame(0, w, h)).unwrap();
    engine.push(&pattern_frame(1, w, h)).unwrap();
    let last: Vec<(u64, u64)> = engine
        .flush()
        .unwrap()
        .iter()
        .map(|p| (p.from, p.to))
        .collect();
    assert_eq!(last, vec![(0, 1)]);
}

/// The rerun CLI (`STREAMRECON_RERUN_BIN`, or `rerun` on PATH), for reading recordings back;
/// `None` when there is none and the test command did not ask for it.
pub fn rerun_cli() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("STREAMRECON_RERUN_BIN") {
        return Some(p.into());
    }
    let found = std::process::Command::new("rerun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("rerun".into());
    }
    assert!(
        std::env::var("STREAMRECON_REQUIRE_RERUN_CLI").is_err(),
        "rerun CLI required but not found (scripts/test installs rerun-sdk==0.36.3)"
    );
    None
}

/// What `rerun rrd print --verbose` says of a recording (stdout and stderr).
pub fn rrd_print(rerun: &Path, rrd: &Path) -> String {
    let p = std::process::Command::new(rerun)
        .args(["rrd", "print", "--verbose"])
        .arg(rrd)
        .output()
        .unwrap();
    assert!(
        p.status.success(),
        "rerun rrd print failed: {}",
        String::from_utf8_lossy(&p.stderr)
    );
    String::from_utf8_lossy(&p.stdout).to_string() + &String::from_utf8_lossy(&p.stderr)
}
