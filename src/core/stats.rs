//! Run statistics: per-stage timings with bounded memory (log-spaced histogram) and process memory.

use serde::Serialize;

/// Histogram bins cover 0.01 ms … 100 s with ~1 % relative resolution.
const BINS: usize = 1600;
const MIN_MS: f64 = 0.01;
const RATIO: f64 = 1.01;

/// Timing summary of one stage.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TimingSummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

/// Accumulates durations in constant memory.
#[derive(Debug, Clone)]
pub struct Timing {
    bins: Vec<u32>,
    count: u64,
    sum: f64,
    max: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            bins: vec![0; BINS],
            count: 0,
            sum: 0.0,
            max: 0.0,
        }
    }
}

impl Timing {
    pub fn add(&mut self, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        let b = if ms <= MIN_MS {
            0
        } else {
            ((ms / MIN_MS).ln() / RATIO.ln()) as usize
        };
        self.bins[b.min(BINS - 1)] += 1;
        self.count += 1;
        self.sum += ms;
        self.max = self.max.max(ms);
    }

    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut acc = 0u64;
        for (i, &c) in self.bins.iter().enumerate() {
            acc += u64::from(c);
            if acc >= target {
                return (MIN_MS * RATIO.powi(i as i32 + 1)).min(self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> TimingSummary {
        TimingSummary {
            count: self.count,
            mean_ms: if self.count == 0 {
                0.0
            } else {
                self.sum / self.count as f64
            },
            p95_ms: self.quantile(0.95),
            max_ms: self.max,
        }
    }
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory now, MiB (0 where /proc is unavailable).
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:").map_or(0.0, |k| k as f64 / 1024.0)
}

/// CPU time this process has used, user + system, all threads, in seconds (0 where /proc is
/// unavailable). With a machine's core count it bounds throughput: on 2 cores, a pipeline
/// that needs c CPU-seconds a frame cannot exceed 2/c frames a second (benchmarks).
pub fn process_cpu_seconds() -> f64 {
    cpu_seconds_in("/proc/self/stat")
}

/// [`process_cpu_seconds`] of another process (a server a benchmark drives), by its id.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    cpu_seconds_in(&format!("/proc/{pid}/stat"))
}

fn cpu_seconds_in(stat_file: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_file) else {
        return 0.0;
    };
    // Fields after the parenthesised command name (which may hold spaces): utime and stime
    // are the 12th and 13th, in USER_HZ ticks (100 a second in Linux's user ABI).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() / 100.0
}

/// Peak resident memory, MiB (0 where /proc is unavailable).
pub fn peak_rss_mib() -> f64 {
    proc_status_kib("VmHWM:").map_or(0.0, |k| k as f64 / 1024.0)
}
