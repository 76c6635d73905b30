//! `GET /metrics`: Prometheus text. Per session: frames received, dropped and processed, and
//! histograms of each stage's milliseconds (flow, geometry, fusion) and of the whole way from
//! frame to result, over the results the session still holds.

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

/// The stages timed per result.
const STAGES: [(&str, StageMs); 4] = [
    ("end_to_end", |r| r.latency_ms),
    ("flow", |r| r.flow_ms),
    ("geometry", |r| r.geometry_ms),
    ("fusion", |r| r.fusion_ms),
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
        for (stage, ms) in STAGES {
            let labels = format!("session=\"{}\",stage=\"{stage}\"", s.id);
            let mut counts = [0usize; BUCKETS_MS.len()];
            let mut sum = 0.0;
            for r in ring.iter() {
                let v = ms(r);
                sum += v;
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
            let _ = writeln!(
                out,
                "streamrecon_latency_ms_bucket{{{labels},le=\"+Inf\"}} {}",
                ring.len()
            );
            let _ = writeln!(out, "streamrecon_latency_ms_sum{{{labels}}} {sum:.1}");
            let _ = writeln!(
                out,
                "streamrecon_latency_ms_count{{{labels}}} {}",
                ring.len()
            );
        }
    }
    let _ = writeln!(out, "# TYPE streamrecon_rss_mib gauge");
    let _ = writeln!(
        out,
        "streamrecon_rss_mib {:.1}",
        streamrecon_core::stats::rss_mib()
    );
    out
}
