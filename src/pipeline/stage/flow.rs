//! The flow thread: pushes each frame into the flow engine and hands frames on in order, each
//! with the pair flow into it once the engine has it (windowed engines answer a few frames late).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use streamrecon_core::error::Result;
use streamrecon_core::frame::Frame;
use streamrecon_flow::{FlowEngine, PairFlow};

use super::{spawn, ErrorSlot, FlowMsg, SourceMsg};

/// Starts the flow thread. `primer`: a frame the engine sees first and that goes no further (a
/// resumed stream's last frame before its snapshot, so the first new frame's flow links to it).
pub(crate) fn start(
    mut engine: Box<dyn FlowEngine>,
    primer: Option<Frame>,
    rx: Receiver<SourceMsg>,
    tx: Sender<FlowMsg>,
    stop: Arc<AtomicBool>,
    errors: ErrorSlot,
) -> Result<JoinHandle<()>> {
    spawn("flow", move || {
        // Frames waiting for their incoming pair (t−1, t). Frames leave in order.
        let mut pending: VecDeque<FlowMsg> = VecDeque::new();
        let mut first: Option<u64> = None;
        if let Some(p) = primer {
            // Its own flows (none for a first frame) concern no frame that goes on.
            if let Err(e) = engine.push(&p) {
                log::warn!(
                    "the resumed stream's last frame did not go through the flow engine: {e}"
                );
            }
            first = Some(p.index);
        }
        let attach = |pending: &mut VecDeque<FlowMsg>, pairs: Vec<PairFlow>| {
            for p in pairs {
                if let Some(m) = pending.iter_mut().find(|m| m.frame.index == p.to) {
                    m.flow = Some(p);
                }
            }
        };
        let send_ready = |pending: &mut VecDeque<FlowMsg>, first: Option<u64>, all: bool| {
            while let Some(front) = pending.front() {
                let ready = all || front.flow.is_some() || Some(front.frame.index) == first;
                if !ready {
                    break;
                }
                let Some(m) = pending.pop_front() else { break };
                if tx.send(m).is_err() {
                    return false;
                }
            }
            true
        };
        for msg in &rx {
            first.get_or_insert(msg.frame.index);
            let t0 = Instant::now();
            match engine.push(&msg.frame) {
                Ok(pairs) => {
                    pending.push_back(FlowMsg {
                        frame: msg.frame,
                        read_at: msg.read_at,
                        flow: None,
                        flow_ms: t0.elapsed().as_secs_f64() * 1e3,
                    });
                    attach(&mut pending, pairs);
                    if !send_ready(&mut pending, first, false) {
                        return;
                    }
                }
                Err(e) => {
                    errors.set(e);
                    stop.store(true, Ordering::SeqCst);
                    // Keep draining so the source thread can finish.
                }
            }
        }
        match engine.flush() {
            Ok(pairs) => attach(&mut pending, pairs),
            Err(e) => errors.set(e),
        }
        send_ready(&mut pending, first, true);
    })
}
