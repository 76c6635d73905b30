//! Engine snapshots written by the geometry stage and put in place by the file sink.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use streamrecon_core::error::Error;

use crate::sinks::files::RunOutputs;

/// File name of the engine snapshot in the output folder.
pub const SNAPSHOT_FILE: &str = "snapshot.safetensors";
/// File name of the fused cloud saved with the snapshot (`Fusion::to_bytes`), beside it.
pub const CLOUD_FILE: &str = "snapshot-cloud.bin";

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
    /// Whether it is put in place once the frames before `handled_next` are in the outputs.
    fn is_due(&self, handled_next: u64) -> bool {
        self.next <= handled_next
    }

    pub(crate) fn path_in(dir: &Path) -> PathBuf {
        dir.join(format!("{SNAPSHOT_FILE}.pending"))
    }

    /// Once every source frame before the pending snapshot's `next` is in the outputs
    /// (`handled_next` ≥ `next`): writes the trajectory checkpoint, then moves the snapshot into
    /// place, so a snapshot in place never runs ahead of the checkpoint beside it.
    pub(crate) fn commit(slot: &Mutex<Option<Self>>, handled_next: u64, outputs: &RunOutputs) {
        let Ok(mut slot) = slot.lock() else { return };
        let Some(p) = slot.as_ref().filter(|p| p.is_due(handled_next)) else {
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

/// Saves the fused cloud beside a snapshot just before the file sink puts the snapshot in place
/// (both happen on the sinks' thread, in the same frame's turn), so a resumed run continues the
/// cloud the frames before the snapshot made. Written first: a process killed between the two
/// leaves a cloud newer than the snapshot in place, which the resume then does not take.
pub(crate) struct CloudSaver {
    path: PathBuf,
    slot: SnapshotSlot,
    saved_for: Option<u64>,
}

impl CloudSaver {
    pub(crate) fn new(dir: &Path, slot: SnapshotSlot) -> Self {
        Self {
            path: dir.join(CLOUD_FILE),
            slot,
            saved_for: None,
        }
    }

    /// Saves the cloud if the file sink is about to put the pending snapshot in place (the frames
    /// before `handled_next` in the outputs: [`PendingSnapshot::is_due`]); returns whether it is.
    pub(crate) fn save_if_due(
        &mut self,
        fusion: &crate::fusion::Fusion,
        handled_next: u64,
    ) -> bool {
        let due = self
            .slot
            .lock()
            .ok()
            .and_then(|s| {
                s.as_ref()
                    .filter(|p| p.is_due(handled_next))
                    .map(|p| p.next)
            })
            .filter(|&next| Some(next) != self.saved_for);
        let Some(next) = due else { return false };
        match streamrecon_core::io_util::write_bytes_atomic(&self.path, &fusion.to_bytes(next)) {
            Ok(()) => self.saved_for = Some(next),
            Err(e) => log::error!("the cloud at source frame {next} not saved: {e}"),
        }
        true
    }
}

/// Takes back the cloud saved beside `snapshot` if it was saved at `next`, the frame the run
/// resumes at; otherwise the cloud starts empty (said in the log).
pub(crate) fn restore_cloud(fusion: &mut crate::fusion::Fusion, snapshot: &Path, next: u64) {
    let path = snapshot.with_file_name(CLOUD_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!("no saved cloud beside the snapshot: the cloud starts at frame {next}");
            return;
        }
        Err(e) => {
            log::warn!("{}: {e}; the cloud starts at frame {next}", path.display());
            return;
        }
    };
    match fusion.restore(&bytes, next) {
        Ok(n) => log::info!("{n} voxels of the cloud restored from {}", path.display()),
        Err(e) => log::warn!("{}: {e}; the cloud starts at frame {next}", path.display()),
    }
}
