//! The terminal's progress bar.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use streamrecon_core::error::Result;
use streamrecon_core::stats::rss_mib;

use super::{FrameOutput, RunEnd, Sink, Tick};

/// A progress bar (frames of `total`, or a spinner for endless sources) with the stream's rate.
pub struct ProgressSink {
    bar: ProgressBar,
    processed: u64,
}

impl ProgressSink {
    pub fn new(total: Option<usize>) -> Self {
        let bar = match total {
            Some(n) => ProgressBar::new(n as u64).with_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} frames  eta {eta}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} frames  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar, processed: 0 }
    }
}

impl Sink for ProgressSink {
    fn name(&self) -> &'static str {
        "progress"
    }

    fn frame(&mut self, _out: &FrameOutput<'_>) -> Result<()> {
        self.processed += 1;
        self.bar.set_position(self.processed);
        Ok(())
    }

    fn tick(&mut self, t: &Tick) {
        self.bar.set_message(format!(
            "{:.1} fps, {:.0} MiB, {} points, dropped {}",
            t.fps,
            rss_mib(),
            t.cloud_points,
            t.frames_dropped
        ));
    }

    fn finish(&mut self, _end: &RunEnd<'_>) -> Result<()> {
        self.bar.finish_and_clear();
        Ok(())
    }
}
