//! `GET /metrics`: Prometheus text. Per session: frames received, dropped and processed, and
//! histograms over the results the session still holds: each stage's milliseconds (flow,
//! geometry, fusion), the waits before each stage and inside the engines (`wait_*`, `held`),
//! the whole way from a frame's upload to its pose (`end_to_end`) and to its first result
//! (`first_answer`: a frame the engine holds gets a pending one at once).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;

use super::{lock, Session, Shared};
use streamrecon_pipeline::{FrameCounts, FrameResult};

/// Upper bounds of the latency histograms, milliseconds.
const BUCKETS_MS: [f64; 10] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

/// One of a session's frame counts.
type Counter = fn(&FrameCounts) -> u64;

/// Milliseconds of one stage in a result.
type StageMs = fn(&FrameResult) -> f64;

/// The stages timed per result with a pose.
const STAGES: [(&str, StageMs); 9] = [
    ("end_to_end", |r| r.latency_ms),
    ("flow", |r| r.flow_ms),
    ("geometry", |r| r.geometry_ms),
    ("fusion", |r| r.fusion_ms),
    ("wait_door", |r| r.waits_ms.door),
    ("wait_flow", |r| r.waits_ms.flow),
    ("wait_geometry", |r| r.waits_ms.geometry),
    ("wait_sinks", |r| r.waits_ms.sinks),
    ("held", |r| r.waits_ms.held),
];

pub(super) async fn page(State(state): State<Shared>) -> String {
    let sessions: Vec<Arc<Session>> = lock(&state.sessions).values().cloned().collect();
    let running = sessions.iter().filter(|s| s.running()).count();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# TYPE streamrecon_sessions gauge");
    let _ = writeln!(out, "streamrecon_sessions{{state=\"running\"}} {running}");
    let _ = writeln!(
        out,
        "streamrecon_sessions{{state=\"stopped\"}} {}",
        sessions.len() - running
    );
    let counters: [(&str, Counter); 6] = [
        ("frames_received", |c| c.received),
        ("frames_dropped", FrameCounts::dropped),
        ("frames_dropped_at_door", |c| c.dropped_at_door),
        ("frames_dropped_inside", |c| c.dropped_inside),
        ("frames_skipped", |c| c.skipped),
        ("frames_processed", |c| c.processed),
    ];
    // One reading per session, so a session's lines agree with each other.
    let counts: Vec<FrameCounts> = sessions.iter().map(|s| s.counters.get()).collect();
    for (name, f) in counters {
        let _ = writeln!(out, "# TYPE streamrecon_{name}_total counter");
        for (s, c) in sessions.iter().zip(&counts) {
            let _ = writeln!(
                out,
                "streamrecon_{name}_total{{session=\"{}\"}} {}",
                s.id,
                f(c)
            );
        }
    }
    let _ = writeln!(out, "# TYPE streamrecon_latency_ms histogram");
    for s in &sessions {
        let ring = lock(&s.results);
        let placed: Vec<&FrameResult> = ring.iter().filter(|r| !r.pending).collect();
        for (stage, ms) in STAGES {
            let values: Vec<f64> = placed.iter().map(|r| ms(r)).collect();
            histogram(&mut out, &s.id, stage, &values);
        }
        // A frame's first result: pending, or its pose when it was not held.
        let mut answered = std::collections::HashSet::new();
        let first: Vec<f64> = ring
            .iter()
            .filter(|r| answered.insert(r.index))
            .map(|r| r.latency_ms)
            .collect();
        histogram(&mut out, &s.id, "first_answer", &first);
    }
    let _ = writeln!(out, "# TYPE streamrecon_rss_mib gauge");
    let _ = writeln!(
        out,
        "streamrecon_rss_mib {:.1}",
        streamrecon_core::stats::rss_mib()
    );
    out
}

/// One histogram of `streamrecon_latency_ms`.
fn histogram(out: &mut String, session: &str, stage: &str, values: &[f64]) {
    let labels = format!("session=\"{session}\",stage=\"{stage}\"");
    let mut counts = [0usize; BUCKETS_MS.len()];
    for &v in values {
        if let Some(b) = BUCKETS_MS.iter().position(|&le| v <= le) {
            counts[b] += 1;
        }
    }
    let mut cumulative = 0;
    for (le, n) in BUCKETS_MS.iter().zip(counts) {
        cumulative += n;
        let _ = writeln!(
            out,
            "streamrecon_latency_ms_bucket{{{labels},le=\"{le}\"}} {cumulative}"
        );
    }
    let n = values.len();
    let _ = writeln!(
        out,
        "streamrecon_latency_ms_bucket{{{labels},le=\"+Inf\"}} {n}"
    );
    let _ = writeln!(
        out,
        "streamrecon_latency_ms_sum{{{labels}}} {:.1}",
        values.iter().sum::<f64>()
    );
    let _ = writeln!(out, "streamrecon_latency_ms_count{{{labels}}} {n}");
}
