//! The stage threads — source, flow, geometry —, the messages between them and how their
//! failures reach the run.

pub(crate) mod flow;
pub(crate) mod geometry;
pub(crate) mod source;

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::Frame;
use streamrecon_flow::PairFlow;
use streamrecon_geometry::FrameGeometry;

/// Source → flow.
pub(crate) struct SourceMsg {
    pub(crate) frame: Frame,
    pub(crate) read_at: Instant,
}

/// Flow → geometry.
pub(crate) struct FlowMsg {
    pub(crate) frame: Frame,
    pub(crate) read_at: Instant,
    pub(crate) flow: Option<PairFlow>,
    pub(crate) flow_ms: f64,
}

/// Geometry → fusion and the sinks.
pub(crate) struct GeometryMsg {
    pub(crate) frame: Frame,
    pub(crate) read_at: Instant,
    pub(crate) geometry: FrameGeometry,
    /// The backward flow into this frame, kept for sinks that show it (made into an image on
    /// their side, off the geometry thread).
    pub(crate) flow_bwd: Option<FlowField>,
    pub(crate) flow_ms: f64,
    pub(crate) geometry_ms: f64,
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
