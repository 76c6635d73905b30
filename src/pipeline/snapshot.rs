//! Engine snapshots written by the geometry stage and put in place by the file sink.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use streamrecon_core::error::Error;

use crate::sinks::files::RunOutputs;

/// File name of the engine snapshot in the output folder.
pub const SNAPSHOT_FILE: &str = "snapshot.safetensors";

/// An engine snapshot on disk that is not yet the one a resume reads. The engine writes it when
/// it has taken frames up to `next`, but frames before `next` may still be on their way to the
/// outputs (in channels, or held by a smoother): put in place before they are written and the
/// process killed, a resume would skip frames whose poses no file holds.
pub(crate) struct PendingSnapshot {
    pub(crate) next: u64,
    pub(crate) path: PathBuf,
}

/// The one snapshot waiting for its frames, shared by the geometry stage (which writes it) and
/// the file sink (which puts it in place).
pub(crate) type SnapshotSlot = Arc<Mutex<Option<PendingSnapshot>>>;

impl PendingSnapshot {
    pub(crate) fn path_in(dir: &Path) -> PathBuf {
        dir.join(format!("{SNAPSHOT_FILE}.pending"))
    }

    /// Once every source frame before the pending snapshot's `next` is in the outputs
    /// (`handled_next` ≥ `next`): writes the trajectory checkpoint, then moves the snapshot into
    /// place, so a snapshot in place never runs ahead of the checkpoint beside it.
    pub(crate) fn commit(slot: &Mutex<Option<Self>>, handled_next: u64, outputs: &RunOutputs) {
        let Ok(mut slot) = slot.lock() else { return };
        let Some(p) = slot.as_ref().filter(|p| p.next <= handled_next) else {
            return;
        };
        let target = p.path.with_file_name(SNAPSHOT_FILE);
        let res = outputs
            .checkpoint()
            .and_then(|()| std::fs::rename(&p.path, &target).map_err(|e| Error::io(&target, e)));
        match res {
            Ok(()) => log::debug!("snapshot at source frame {} in place", p.next),
            // The previous snapshot and checkpoint stay in force.
            Err(e) => log::error!("snapshot at source frame {} not put in place: {e}", p.next),
        }
        *slot = None;
    }
}
