//! The stage threads — source, flow, geometry —, the messages between them and how their
//! failures reach the run.

pub(crate) mod flow;
pub(crate) mod geometry;
pub(crate) mod source;

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::Frame;
use streamrecon_flow::PairFlow;
use streamrecon_geometry::FrameGeometry;

use crate::sinks::Waits;

/// A frame's way through the stages: when it arrived, where its current wait began, its
/// waits so far and the stages' work on it.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    /// A pushed frame's upload, any other frame's reading: what its latency counts from.
    pub(crate) arrived: Instant,
    /// When the last stage handed it on.
    handed: Instant,
    pub(crate) waits: Waits,
    pub(crate) flow_ms: f64,
    pub(crate) geometry_ms: f64,
    /// Whether the frame has given back its place in the [`Gate`].
    let_go: bool,
}

impl Clock {
    /// The clock of a frame the source read now; `arrived`: when it was uploaded, if pushed.
    pub(crate) fn read(arrived: Option<Instant>) -> Self {
        let now = Instant::now();
        let arrived = arrived.unwrap_or(now);
        Self {
            arrived,
            handed: now,
            waits: Waits {
                door: ms(now.saturating_duration_since(arrived)),
                ..Waits::default()
            },
            flow_ms: 0.0,
            geometry_ms: 0.0,
            let_go: false,
        }
    }

    /// Milliseconds since the frame was last handed on (its wait, when a stage takes it).
    pub(crate) fn waited(&self) -> f64 {
        ms(self.handed.elapsed())
    }

    /// The frame leaves a stage (or starts a wait inside one) now.
    pub(crate) fn hand_on(&mut self) {
        self.handed = Instant::now();
    }

    /// Milliseconds since the frame arrived.
    pub(crate) fn latency_ms(&self) -> f64 {
        ms(self.arrived.elapsed())
    }
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How many frames may be in the stages at once ([`crate::PipelineConfig::in_flight`]): the
/// source takes a place before reading a frame; the frame gives it back when it has left the
/// sinks, is dropped, or is parked in an engine waiting for later frames (which it could not
/// get otherwise). Without a limit every call is free.
#[derive(Clone)]
pub(crate) struct Gate(Option<(Sender<()>, Receiver<()>)>);

impl Gate {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        Self(limit.map(|n| {
            let (tx, rx) = crossbeam_channel::bounded(n.max(1));
            for _ in 0..n.max(1) {
                let _ = tx.send(());
            }
            (tx, rx)
        }))
    }

    /// Waits for a place; false when the run is stopping.
    pub(crate) fn enter(&self, stop: &AtomicBool) -> bool {
        let Some((_, rx)) = &self.0 else {
            return !stop.load(Ordering::SeqCst);
        };
        while !stop.load(Ordering::SeqCst) {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return true;
            }
        }
        false
    }

    /// A place taken by no frame after all (nothing was read).
    pub(crate) fn give_back(&self) {
        if let Some((tx, _)) = &self.0 {
            let _ = tx.try_send(());
        }
    }

    /// The frame of `clock` gives back its place (once).
    pub(crate) fn leave(&self, clock: &mut Clock) {
        if !clock.let_go {
            clock.let_go = true;
            self.give_back();
        }
    }
}

/// Source → flow.
pub(crate) struct SourceMsg {
    pub(crate) frame: Frame,
    pub(crate) clock: Clock,
}

/// Flow → geometry.
pub(crate) struct FlowMsg {
    pub(crate) frame: Frame,
    pub(crate) clock: Clock,
    pub(crate) flow: Option<PairFlow>,
}

/// Geometry → fusion and the sinks.
pub(crate) struct GeometryMsg {
    pub(crate) frame: Frame,
    pub(crate) clock: Clock,
    pub(crate) geometry: FrameGeometry,
    /// The backward flow into this frame, kept for sinks that show it (made into an image on
    /// their side, off the geometry thread).
    pub(crate) flow_bwd: Option<FlowField>,
}

/// Keeps the first error any stage reports.
#[derive(Clone, Default)]
pub(crate) struct ErrorSlot(Arc<Mutex<Option<Error>>>);

impl ErrorSlot {
    pub(crate) fn set(&self, e: Error) {
        if let Ok(mut g) = self.0.lock() {
            g.get_or_insert(e);
        }
    }
    pub(crate) fn take(&self) -> Option<Error> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

/// Starts a named stage thread.
pub(crate) fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| Error::Invalid(format!("cannot start thread {name}: {e}")))
}

/// Waits for a stage thread; a panic becomes the run's error (it would otherwise end the
/// stream early with no error at all).
pub(crate) fn join<T: Default>(handle: JoinHandle<T>, errors: &ErrorSlot) -> T {
    let name = handle.thread().name().unwrap_or("stage").to_string();
    handle.join().unwrap_or_else(|payload| {
        let e = Error::Invalid(format!(
            "the {name} stage stopped on a bug: {}",
            panic_message(payload.as_ref())
        ));
        errors.set(e);
        T::default()
    })
}

/// The text of a panic's payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Runs `f` with its rayon work on `pool`, or on the global pool when there is none.
pub(crate) fn on_pool<R: Send>(
    pool: Option<&rayon::ThreadPool>,
    f: impl FnOnce() -> R + Send,
) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}
