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

use super::{ms, spawn, ErrorSlot, FlowMsg, Gate, SourceMsg};

/// Starts the flow thread. `primer`: a frame the engine sees first and that goes no further (a
/// resumed stream's last frame before its snapshot, so the first new frame's flow links to it).
pub(crate) fn start(
    mut engine: Box<dyn FlowEngine>,
    primer: Option<Frame>,
    rx: Receiver<SourceMsg>,
    tx: Sender<FlowMsg>,
    gate: Gate,
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
                let Some(mut m) = pending.pop_front() else {
                    break;
                };
                m.clock.waits.held += m.clock.waited();
                m.clock.hand_on();
                if tx.send(m).is_err() {
                    return false;
                }
            }
            true
        };
        for mut msg in &rx {
            first.get_or_insert(msg.frame.index);
            msg.clock.waits.flow = msg.clock.waited();
            let t0 = Instant::now();
            match engine.push(&msg.frame) {
                Ok(pairs) => {
                    msg.clock.flow_ms = ms(t0.elapsed());
                    msg.clock.hand_on();
                    pending.push_back(FlowMsg {
                        frame: msg.frame,
                        clock: msg.clock,
                        flow: None,
                    });
                    attach(&mut pending, pairs);
                    if !send_ready(&mut pending, first, false) {
                        return;
                    }
                    // Frames parked until a later frame gives their flow.
                    for m in &mut pending {
                        gate.leave(&mut m.clock);
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
