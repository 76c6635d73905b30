//! Whole-pipeline speed and memory: `dis` flow + `flowvo` + fusion + file sinks + rerun saving to a
//! file, on a pre-rendered synthetic 640×480 sequence; then RSS over a long `loop` sequence
//! streamed straight from the renderer (RSS at 10 % of the frames vs the end).
//!
//! `cargo bench --bench pipeline [-- FRAMES [LONG_FRAMES [MAX_POINTS [FLOW_REFINE]]]]` (defaults
//! 300, 2000, the fusion cap's default and the flow engine's default refinement steps; the memory figure in the
//! issues uses 10000; FRAMES 0 skips the speed part, LONG_FRAMES 0 the memory part).
//!
//! Uses the binary's allocator (jemalloc), so RSS is what `streamrecon run` would show.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use streamrecon::datasets::synth::{SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::flow::dis::{DisConfig, DisEngine};
use streamrecon::flow::FlowEngine;
use streamrecon::fusion::{Fusion, FusionConfig};
use streamrecon::geometry::flowvo::{FlowVo, FlowVoConfig};
use streamrecon::geometry::GeometryEngine;
use streamrecon::pipeline::{self, FlowChoice, PipelineConfig};
use streamrecon::source::{Source, SourceOptions, SourceSpec};
use streamrecon::stats::{process_cpu_seconds, rss_mib};
use streamrecon::viewer::RerunTarget;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let frames = nums.first().copied().unwrap_or(300);
    let long = nums.get(1).copied().unwrap_or(2000);
    let cap = nums
        .get(2)
        .copied()
        .unwrap_or(FusionConfig::default().max_points);
    let refine = nums
        .get(3)
        .map_or(DisConfig::default().refine_iterations, |&n| {
            u32::try_from(n).unwrap_or(u32::MAX)
        });
    if frames > 0 {
        speed(frames, refine);
    }
    if long > 0 {
        memory(long, cap);
    }
}

/// The whole pipeline on a pre-rendered sequence, frames per second.
fn speed(frames: usize, refine: u32) {
    let dir = tempfile::tempdir().expect("temp dir");
    let seq = dir.path().join("seq");
    let world = SynthWorld::new(SynthConfig {
        scene: SceneKind::Room,
        trajectory: TrajectoryKind::Handheld,
        frames,
        seed: 3,
        ..SynthConfig::default()
    });
    let mut w = streamrecon::datasets::native::NativeWriter::create(&seq, world.intrinsics)
        .expect("writer");
    for f in world.frames() {
        w.write_frame(&f).expect("write");
    }
    w.finish(
        &streamrecon::cloud::PointCloud::default(),
        &streamrecon::datasets::native::SequenceMeta::default(),
    )
    .expect("finish");
    let out = dir.path().join("out");
    let config = PipelineConfig {
        out_dir: Some(out.clone()),
        rerun: RerunTarget {
            save: Some(out.join("rec.rrd")),
            ..RerunTarget::default()
        },
        flow: FlowChoice::Dis(DisConfig {
            refine_iterations: refine,
            ..DisConfig::default()
        }),
        ..PipelineConfig::default()
    };
    let source = Source::open(
        &SourceSpec::parse(seq.to_str().expect("utf-8")).expect("spec"),
        SourceOptions::default(),
    )
    .expect("source");
    let (t, cpu) = (Instant::now(), process_cpu_seconds());
    let o = pipeline::run(source, &config, &Arc::new(AtomicBool::new(false))).expect("run");
    let dt = t.elapsed().as_secs_f64();
    let cpu_ms = 1e3 * (process_cpu_seconds() - cpu) / frames as f64;
    println!(
        "pipeline 640x480 ({frames} frames, files + .rrd, flow refinement steps {refine}): {:.1} frames/s streaming, {:.1} end to end (final cloud included); {cpu_ms:.1} CPU-ms a frame (all threads; {:.1} frames/s at most on {} cores); stages {:?}",
        o.summary.streaming_fps,
        frames as f64 / dt,
        1e3 * std::thread::available_parallelism().map_or(1, usize::from) as f64 / cpu_ms,
        std::thread::available_parallelism().map_or(1, usize::from),
        o.summary
            .stages
            .iter()
            .map(|(k, v)| format!("{k} {:.1}/{:.1} ms", v.mean_ms, v.p95_ms))
            .collect::<Vec<_>>()
    );
}

/// Memory over a long stream: engines and fusion fed straight from the renderer (no files).
fn memory(long: usize, cap: usize) {
    let world = SynthWorld::new(SynthConfig {
        scene: SceneKind::Room,
        trajectory: TrajectoryKind::Loop,
        frames: long,
        width: 320,
        height: 240,
        seed: 5,
        ..SynthConfig::default()
    });
    let mut flow = DisEngine::new(DisConfig::default()).expect("dis");
    let mut vo = FlowVo::new(FlowVoConfig::default());
    let mut fusion = Fusion::new(FusionConfig {
        max_points: cap,
        ..FusionConfig::default()
    });
    let mut rss_early = 0.0;
    let t = Instant::now();
    for (frame, _) in world.input_frames() {
        let pairs = flow.push(&frame).expect("flow");
        for g in vo.push(&frame, pairs.last()).expect("vo") {
            fusion.integrate(&g, &frame.image);
        }
        // Frames seen so far.
        let seen = frame.index as usize + 1;
        if seen == long / 10 {
            rss_early = rss_mib();
        }
        if seen.is_multiple_of((long / 10).max(1)) {
            println!(
                "  frame {:>6}: RSS {:.1} MiB, {} fused points (table {:.1} MiB), {} map segments so far",
                seen,
                rss_mib(),
                fusion.len(),
                fusion.table_bytes() as f64 / (1024.0 * 1024.0),
                vo.segments()
            );
        }
    }
    println!(
        "long loop 320x240, {long} frames in {:.0} s: RSS {rss_early:.1} MiB at frame {} vs {:.1} MiB at frame {long} ({:+.1} %); {} fused points, {} segments",
        t.elapsed().as_secs_f64(),
        long / 10,
        rss_mib(),
        100.0 * (rss_mib() - rss_early) / rss_early.max(1e-9),
        fusion.len(),
        vo.segments()
    );
}
