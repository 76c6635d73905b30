//! The source thread: reads frames, skips the ones a resumed stream has seen, and hands them on;
//! a live source drops the oldest waiting frame rather than fall behind.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use streamrecon_core::error::Result;
use streamrecon_core::frame::Intrinsics;

use super::{spawn, Clock, ErrorSlot, Gate, SourceMsg};
use crate::source::{Source, SourceItem};
use crate::summary::RunCounters;

/// What the source thread learns beside its counts, read by the run's summary.
#[derive(Clone, Default)]
pub(crate) struct SourceFacts {
    pub(crate) counters: RunCounters,
    /// Whether frames arrive through a door that counts them itself (pushed sources).
    pub(crate) door_counts: bool,
    /// Why the last skipped frame was skipped.
    pub(crate) last_skip: Arc<Mutex<Option<String>>>,
    /// The source's intrinsics at its own resolution, and where they came from.
    pub(crate) original_k: Arc<Mutex<Option<(Intrinsics, &'static str)>>>,
}

/// Starts the source thread. `resume_from`: source frames before it are skipped.
pub(crate) fn start(
    mut source: Source,
    resume_from: u64,
    tx: Sender<SourceMsg>,
    // A live source takes its oldest waiting frame back out of the channel (an offline one
    // holds no receiver, so a flow stage that stops ends its wait).
    rx: Option<Receiver<SourceMsg>>,
    counts: SourceFacts,
    gate: Gate,
    stop: Arc<AtomicBool>,
    errors: ErrorSlot,
) -> Result<JoinHandle<()>> {
    spawn("source", move || {
        // A place in the stages first: a waiting live frame stays at the door, where a newer one
        // replaces it.
        while gate.enter(&stop) {
            let Some(item) = source.next_item() else {
                break;
            };
            match item {
                Ok(SourceItem::Frame(frame)) => {
                    // Frames the resumed stream has already seen.
                    if frame.source_index < resume_from {
                        gate.give_back();
                        continue;
                    }
                    if !counts.door_counts {
                        RunCounters::add(&counts.counters.received);
                    }
                    RunCounters::add(&counts.counters.read);
                    if let Ok(mut k) = counts.original_k.lock() {
                        if k.is_none() {
                            *k = source
                                .original_intrinsics()
                                .map(|i| (i, source.intrinsics_origin()));
                        }
                    }
                    let mut msg = SourceMsg {
                        frame: *frame,
                        clock: Clock::read(source.last_arrived()),
                    };
                    if let Some(rx) = &rx {
                        // Latest wins: make room by discarding the oldest pending frame.
                        loop {
                            match tx.try_send(msg) {
                                Ok(()) => break,
                                Err(TrySendError::Full(m)) => {
                                    if let Ok(mut dropped) = rx.try_recv() {
                                        RunCounters::add(&counts.counters.dropped_inside);
                                        gate.leave(&mut dropped.clock);
                                    }
                                    msg = m;
                                }
                                Err(TrySendError::Disconnected(_)) => return,
                            }
                        }
                    } else if tx.send(msg).is_err() {
                        return;
                    }
                }
                Ok(SourceItem::Skipped { what }) => {
                    gate.give_back();
                    log::warn!("skipped a frame: {what}");
                    if !counts.door_counts {
                        RunCounters::add(&counts.counters.received);
                    }
                    RunCounters::add(&counts.counters.skipped);
                    if let Ok(mut w) = counts.last_skip.lock() {
                        *w = Some(what);
                    }
                }
                Err(e) => {
                    errors.set(e);
                    break;
                }
            }
        }
    })
}
