//! The pipeline's wiring: a stage or a sink that panics or fails ends the run with an error in
//! `RunOutcome` and `run.json`, after every output the run made has been written.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use streamrecon::datasets::synth::TrajectoryKind;
use streamrecon::error::{Error, Result};
use streamrecon::flow::{FlowEngine, PairFlow};
use streamrecon::frame::Frame;
use streamrecon::geometry::{FrameGeometry, GeometryEngine};
use streamrecon::pipeline::{
    self, FrameOutput, PipelineConfig, RunEnd, RunOutcome, RunSummary, Sink,
};
use streamrecon::source::{Source, SourceOptions, SourceSpec};

const FRAMES: usize = 12;

/// A flow engine that panics at one frame and otherwise leaves the work to the real one.
struct PanicsAt {
    inner: Box<dyn FlowEngine>,
    at: u64,
}

impl FlowEngine for PanicsAt {
    fn name(&self) -> &'static str {
        "panics"
    }
    fn push(&mut self, frame: &Frame) -> Result<Vec<PairFlow>> {
        assert!(
            frame.index != self.at,
            "injected failure at frame {}",
            self.at
        );
        self.inner.push(frame)
    }
    fn flush(&mut self) -> Result<Vec<PairFlow>> {
        self.inner.flush()
    }
    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// A geometry engine that panics at one frame and otherwise leaves the work to the real one.
struct GeometryPanicsAt {
    inner: Box<dyn GeometryEngine>,
    at: u64,
}

impl GeometryEngine for GeometryPanicsAt {
    fn name(&self) -> &'static str {
        "panics"
    }
    fn push(&mut self, frame: &Frame, flow: Option<&PairFlow>) -> Result<Vec<FrameGeometry>> {
        assert!(
            frame.index != self.at,
            "injected geometry failure at frame {}",
            self.at
        );
        self.inner.push(frame, flow)
    }
    fn flush(&mut self) -> Result<Vec<FrameGeometry>> {
        self.inner.flush()
    }
    fn segments(&self) -> u32 {
        self.inner.segments()
    }
}

/// A sink that panics or fails at one frame.
struct BadSink {
    at: u64,
    panics: bool,
}

/// A sink that panics as the run closes.
struct PanicsAtFinish;

impl Sink for PanicsAtFinish {
    fn name(&self) -> &'static str {
        "closing"
    }
    fn frame(&mut self, _out: &FrameOutput<'_>) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self, _end: &RunEnd<'_>) -> Result<()> {
        panic!("injected failure at the end");
    }
}

impl Sink for BadSink {
    fn name(&self) -> &'static str {
        "bad"
    }
    fn frame(&mut self, out: &FrameOutput<'_>) -> Result<()> {
        if out.frame.index == self.at {
            assert!(!self.panics, "injected sink failure at frame {}", self.at);
            return Err(Error::Invalid(format!(
                "injected sink error at frame {}",
                self.at
            )));
        }
        Ok(())
    }
    fn finish(&mut self, _end: &RunEnd<'_>) -> Result<()> {
        Ok(())
    }
}

fn sequence(dir: &Path) -> Source {
    common::write_sequence(
        dir,
        &common::synth_config(TrajectoryKind::Handheld, FRAMES, 96, 72, 3),
    );
    let spec = SourceSpec::parse(dir.to_str().unwrap()).unwrap();
    Source::open(&spec, SourceOptions::default()).unwrap()
}

/// Where a run is made to panic.
#[derive(Clone, Copy)]
enum Fault {
    None,
    Flow(u64),
    Geometry(u64),
}

fn run(dir: &Path, fault: Fault, sinks: Vec<Box<dyn Sink>>) -> (RunOutcome, serde_json::Value) {
    let source = sequence(&dir.join("seq"));
    let out = dir.join("out");
    let config = PipelineConfig {
        out_dir: Some(out.clone()),
        ..PipelineConfig::default()
    };
    let mut flow = config.flow.engine().unwrap();
    let mut geometry = config.geometry.engine(None).unwrap();
    match fault {
        Fault::None => {}
        Fault::Flow(at) => flow = Box::new(PanicsAt { inner: flow, at }),
        Fault::Geometry(at) => {
            geometry = Box::new(GeometryPanicsAt {
                inner: geometry,
                at,
            });
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let outcome = pipeline::run_with(source, &config, flow, geometry, sinks, &stop).unwrap();
    let run_json = std::fs::read(out.join("run.json")).unwrap();
    (outcome, serde_json::from_slice(&run_json).unwrap())
}

/// Frames with a pose in the trajectory files: tracked, or orientation-only.
fn posed(summary: &RunSummary) -> usize {
    (summary.frames_tracked + summary.frames_orientation_only) as usize
}

fn trajectory_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("out/trajectory.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count()
}

#[test]
fn a_clean_run_has_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, json) = run(dir.path(), Fault::None, Vec::new());
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert!(json["error"].is_null());
    assert_eq!(outcome.summary.frames_processed, FRAMES as u64);
}

#[test]
fn a_stage_that_panics_is_the_runs_error() {
    for (fault, stage, message) in [
        (Fault::Flow(5), "flow stage", "injected failure at frame 5"),
        (
            Fault::Geometry(4),
            "geometry stage",
            "injected geometry failure at frame 4",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (outcome, json) = run(dir.path(), fault, Vec::new());
        let e = outcome
            .error
            .expect("a panicking stage must fail the run")
            .to_string();
        assert!(e.contains(stage) && e.contains(message), "{e}");
        assert_eq!(json["error"].as_str(), Some(e.as_str()));
        // Frames before the panic went through and are in the files.
        assert!(outcome.summary.frames_processed < FRAMES as u64);
        assert_eq!(trajectory_rows(dir.path()), posed(&outcome.summary));
    }
}

#[test]
fn a_sink_that_panics_as_the_run_closes_is_in_run_json() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, json) = run(dir.path(), Fault::None, vec![Box::new(PanicsAtFinish)]);
    let e = outcome
        .error
        .expect("the panic must fail the run")
        .to_string();
    assert!(
        e.contains("the closing sink stopped on a bug: injected failure at the end"),
        "{e}"
    );
    // The files close after every other sink, so run.json knows.
    assert_eq!(json["error"].as_str(), Some(e.as_str()));
    assert_eq!(outcome.summary.frames_processed, FRAMES as u64);
    assert_eq!(trajectory_rows(dir.path()), posed(&outcome.summary));
}

#[test]
fn a_sink_that_panics_or_fails_is_the_runs_error_and_the_files_are_written() {
    for panics in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let sink = BadSink { at: 3, panics };
        let (outcome, json) = run(dir.path(), Fault::None, vec![Box::new(sink)]);
        let e = outcome
            .error
            .expect("a failing sink must fail the run")
            .to_string();
        let want = if panics {
            "the bad sink stopped on a bug: injected sink failure at frame 3"
        } else {
            "injected sink error at frame 3"
        };
        assert!(e.contains(want), "{e}");
        assert_eq!(json["error"].as_str(), Some(e.as_str()));
        // The source stopped, frames in flight drained into the other sinks.
        assert_eq!(trajectory_rows(dir.path()), posed(&outcome.summary));
        assert!(outcome.summary.frames_processed >= 4);
        assert!(dir.path().join("out/points.ply").exists());
    }
}
