//! File outputs of a run, each written to a temporary name and renamed when complete:
//! `trajectory.txt` (TUM, world_from_cam), `poses_kitti.txt`, `points.ply`, `colmap/` (text model),
//! `depth/<frame>.png` (16-bit mm), `intrinsics.json` and `run.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{pose_from_array, pose_to_array, Intrinsics, Pose};
use streamrecon_core::io_util::{create_dir, write_atomic, write_bytes_atomic};
use streamrecon_datasets::formats::{depth, ply, tum};
use streamrecon_geometry::loop_closure::Corrected;

use super::{FrameOutput, RunEnd, Sink};
use crate::snapshot::{PendingSnapshot, SnapshotSlot};
use crate::summary::RunSummary;

/// Intrinsics reported for both resolutions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IntrinsicsReport {
    /// At the resolution the source delivered.
    pub original: Intrinsics,
    /// At the resolution the geometry engine worked at.
    pub model: Intrinsics,
    /// Where the values came from: "user", "dataset" or "default 60° horizontal FoV".
    pub origin: &'static str,
}

/// The checkpointed trajectory with frame numbers (read back by a resumed run).
pub const CHECKPOINT_FILE: &str = "checkpoint.json";

#[derive(Serialize, serde::Deserialize)]
struct Checkpointed {
    index: u64,
    timestamp: f64,
    /// tx ty tz qx qy qz qw (world_from_cam).
    pose: [f64; 7],
}

struct Posed {
    index: u64,
    timestamp: f64,
    world_from_cam: Pose,
}

/// Collects a run's outputs and writes them.
pub struct RunOutputs {
    dir: PathBuf,
    depth_every: u64,
    poses: Vec<Posed>,
    depth_written: u64,
}

/// What a run's end wrote to its output folder and what it could not (`run.json`'s `outputs`;
/// the command line's last line).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutputsReport {
    pub dir: PathBuf,
    /// Files written at the end, in order.
    pub written: Vec<String>,
    /// Files that could not be written, with why.
    pub not_written: Vec<(String, String)>,
    /// Depth maps written during the run.
    pub depth_maps: u64,
    /// Where `run.json` went when the output folder could not take it.
    pub run_json_elsewhere: Option<PathBuf>,
}

impl OutputsReport {
    fn note(&mut self, file: &str, r: Result<()>) {
        match r {
            Ok(()) => self.written.push(file.to_string()),
            Err(e) => {
                log::error!("{file} not written: {e}");
                self.not_written.push((file.to_string(), e.to_string()));
            }
        }
    }

    /// "not written: …" when something is missing.
    fn missing(&self) -> Option<String> {
        (!self.not_written.is_empty()).then(|| {
            let files: Vec<String> = self
                .not_written
                .iter()
                .map(|(f, why)| format!("{f} ({why})"))
                .collect();
            format!("outputs not written: {}", files.join(", "))
        })
    }

    /// One line: the folder, what is in it, what is not, and where run.json went if elsewhere.
    pub fn describe(&self) -> String {
        let mut line = format!("outputs in {}: ", self.dir.display());
        let mut written = self.written.clone();
        if self.depth_maps > 0 {
            written.push(format!("{} depth maps", self.depth_maps));
        }
        line += &if written.is_empty() {
            "nothing written".to_string()
        } else {
            written.join(", ")
        };
        if let Some(m) = self.missing() {
            let _ = write!(line, "; {m}");
        }
        if let Some(p) = &self.run_json_elsewhere {
            let _ = write!(line, "; run.json written to {} instead", p.display());
        }
        line
    }
}

fn json_bytes(v: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(e.to_string()))
}

impl RunOutputs {
    /// Creates the output folder and checks it is writable.
    ///
    /// # Errors
    /// The folder cannot be created or written.
    pub fn create(dir: &Path, depth_every: u64) -> Result<Self> {
        create_dir(dir)?;
        if depth_every > 0 {
            create_dir(&dir.join("depth"))?;
        }
        // Fail now, not after an hour of processing.
        let probe = dir.join(".streamrecon-write-test");
        std::fs::write(&probe, b"ok").map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            dir: dir.to_path_buf(),
            depth_every,
            poses: Vec::new(),
            depth_written: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a frame's pose and writes its depth PNG (every `depth_every` frames).
    ///
    /// # Errors
    /// The depth file cannot be written.
    pub fn add_frame(
        &mut self,
        index: u64,
        timestamp: f64,
        world_from_cam: Pose,
        depth_mm: Option<(&[u16], &Intrinsics)>,
    ) -> Result<()> {
        self.poses.push(Posed {
            index,
            timestamp,
            world_from_cam,
        });
        if let Some((mm, k)) = depth_mm {
            if self.depth_every > 0 && index.is_multiple_of(self.depth_every) {
                let p = self.dir.join("depth").join(format!("{index:06}.png"));
                depth::write_millimetre_png(&p, k.width as usize, k.height as usize, mm)?;
                self.depth_written += 1;
            }
        }
        Ok(())
    }

    /// Writes `trajectory.txt` and `checkpoint.json` (the poses with their frame numbers) as
    /// they are now, so an interrupted run keeps its trajectory.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn checkpoint(&self) -> Result<()> {
        tum::write_tum(&self.dir.join("trajectory.txt"), &self.stamped())?;
        let rows: Vec<Checkpointed> = self
            .poses
            .iter()
            .map(|p| Checkpointed {
                index: p.index,
                timestamp: p.timestamp,
                pose: pose_to_array(&p.world_from_cam),
            })
            .collect();
        let json = serde_json::to_vec(&rows).map_err(|e| Error::Invalid(e.to_string()))?;
        write_bytes_atomic(&self.dir.join(CHECKPOINT_FILE), &json)
    }

    /// Takes back the checkpointed poses of frames before `next` from the checkpoint in `dir`
    /// (the snapshot's folder: this run's, or the interrupted run's when this one writes
    /// elsewhere); returns how many.
    ///
    /// # Errors
    /// A checkpoint that exists but cannot be read.
    pub fn restore_checkpoint(&mut self, next: u64, dir: &Path) -> Result<usize> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let rows: Vec<Checkpointed> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        self.poses = rows
            .into_iter()
            .filter(|r| r.index < next)
            .filter_map(|r| {
                Some(Posed {
                    index: r.index,
                    timestamp: r.timestamp,
                    world_from_cam: pose_from_array(r.pose)?,
                })
            })
            .collect();
        Ok(self.poses.len())
    }

    pub fn frames(&self) -> usize {
        self.poses.len()
    }

    fn stamped(&self) -> Vec<tum::StampedPose> {
        self.poses
            .iter()
            .map(|p| tum::StampedPose {
                timestamp: p.timestamp,
                world_from_cam: p.world_from_cam,
            })
            .collect()
    }

    /// Writes every file that summarises the run, each attempted whatever happened to the
    /// others, `run.json` last with what the others did; says what was and was not written.
    /// `run.json` goes to the system's temporary folder when the output folder cannot take it.
    /// `corrected`: the frames after loop closure, for the trajectory files; the online poses
    /// then go to `trajectory_online.txt`.
    pub fn finish(
        &self,
        cloud: &PointCloud,
        intrinsics: Option<&IntrinsicsReport>,
        summary: &RunSummary,
        corrected: Option<&[Corrected]>,
    ) -> OutputsReport {
        let mut stamped = self.stamped();
        let mut report = OutputsReport {
            dir: self.dir.clone(),
            depth_maps: self.depth_written,
            ..OutputsReport::default()
        };
        if let Some(c) = corrected {
            report.note(
                "trajectory_online.txt",
                tum::write_tum(&self.dir.join("trajectory_online.txt"), &stamped),
            );
            let by_index: std::collections::HashMap<u64, Pose> =
                c.iter().map(|f| (f.index, f.world_from_cam)).collect();
            for (s, p) in stamped.iter_mut().zip(&self.poses) {
                if let Some(q) = by_index.get(&p.index) {
                    s.world_from_cam = *q;
                }
            }
        }
        report.note(
            "trajectory.txt",
            tum::write_tum(&self.dir.join("trajectory.txt"), &stamped),
        );
        report.note(
            "poses_kitti.txt",
            write_bytes_atomic(
                &self.dir.join("poses_kitti.txt"),
                tum::kitti_poses_to_string(&stamped).as_bytes(),
            ),
        );
        report.note(
            "points.ply",
            ply::write_ply(&self.dir.join("points.ply"), cloud),
        );
        if let Some(k) = intrinsics {
            report.note(
                "intrinsics.json",
                json_bytes(k)
                    .and_then(|j| write_bytes_atomic(&self.dir.join("intrinsics.json"), &j)),
            );
            report.note("colmap/", self.write_colmap(cloud, &k.model, &stamped));
        }
        let mut summary = summary.clone();
        if let Some(missing) = report.missing() {
            summary.error = Some(match summary.error.take() {
                Some(e) => format!("{e}; {missing}"),
                None => missing,
            });
        }
        summary.outputs = Some(report.clone());
        match json_bytes(&summary).and_then(|j| self.write_run_json(&j)) {
            Ok(None) => report.written.push("run.json".into()),
            Ok(Some(elsewhere)) => report.run_json_elsewhere = Some(elsewhere),
            Err(e) => report.note("run.json", Err(e)),
        }
        report
    }

    /// Writes `run.json` into the folder, or, when the folder cannot take it, into the system's
    /// temporary folder (where the failure is recorded must not be the disk that failed);
    /// returns where it went in that case.
    fn write_run_json(&self, json: &[u8]) -> Result<Option<PathBuf>> {
        let Err(e) = write_bytes_atomic(&self.dir.join("run.json"), json) else {
            return Ok(None);
        };
        let elsewhere =
            std::env::temp_dir().join(format!("streamrecon-run-{}.json", std::process::id()));
        log::error!("{e}; writing run.json to {} instead", elsewhere.display());
        write_bytes_atomic(&elsewhere, json)
            .map(|()| Some(elsewhere))
            .map_err(|e2| Error::Invalid(format!("{e}; and {e2}")))
    }

    /// COLMAP text model: one PINHOLE camera, one image per frame at its pose in `stamped` (the
    /// trajectory's, corrected after loop closure), the fused points (no tracks).
    fn write_colmap(
        &self,
        cloud: &PointCloud,
        k: &Intrinsics,
        stamped: &[tum::StampedPose],
    ) -> Result<()> {
        let dir = self.dir.join("colmap");
        create_dir(&dir)?;
        // COLMAP puts pixel centres at +0.5.
        let cameras = format!(
            "# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n1 PINHOLE {} {} {} {} {} {}\n",
            k.width,
            k.height,
            k.fx,
            k.fy,
            k.cx + 0.5,
            k.cy + 0.5
        );
        write_bytes_atomic(&dir.join("cameras.txt"), cameras.as_bytes())?;
        let mut images = String::from(
            "# Image list with two lines of data per image:\n#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n#   POINTS2D[] as (X, Y, POINT3D_ID)\n",
        );
        for (i, (p, s)) in self.poses.iter().zip(stamped).enumerate() {
            let cfw = s.world_from_cam.inverse();
            let q = cfw.rotation.coords;
            let t = cfw.translation.vector;
            let _ = writeln!(
                images,
                "{} {} {} {} {} {} {} {} 1 {:06}.png\n",
                i + 1,
                q.w,
                q.x,
                q.y,
                q.z,
                t.x,
                t.y,
                t.z,
                p.index
            );
        }
        write_bytes_atomic(&dir.join("images.txt"), images.as_bytes())?;
        write_atomic(&dir.join("points3D.txt"), |w| {
            writeln!(w, "# 3D point list with one line of data per point:\n#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)")?;
            for (i, p) in cloud.points.iter().enumerate() {
                let c = cloud.colors.as_ref().map_or([128, 128, 128], |c| c[i]);
                writeln!(
                    w,
                    "{} {} {} {} {} {} {} 0",
                    i + 1,
                    p[0],
                    p[1],
                    p[2],
                    c[0],
                    c[1],
                    c[2]
                )?;
            }
            Ok(())
        })
    }
}

/// The run's files (trajectory, poses, depth PNGs, cloud, COLMAP model, run.json), and the
/// engine snapshot put in place once every frame before it is in them.
pub struct FilesSink {
    outputs: RunOutputs,
    /// What the end wrote, for the caller.
    report: Arc<Mutex<Option<OutputsReport>>>,
    snapshot: SnapshotSlot,
    /// Source frames before this one have reached the outputs.
    handled_next: u64,
}

impl FilesSink {
    /// `resumed_at`: the source frame a resumed run starts at (0 for a new run).
    pub(crate) fn new(
        outputs: RunOutputs,
        snapshot: SnapshotSlot,
        resumed_at: u64,
        report: Arc<Mutex<Option<OutputsReport>>>,
    ) -> Self {
        Self {
            outputs,
            report,
            snapshot,
            handled_next: resumed_at,
        }
    }
}

impl Sink for FilesSink {
    fn name(&self) -> &'static str {
        "files"
    }

    fn frame(&mut self, out: &FrameOutput<'_>) -> Result<()> {
        let g = out.geometry;
        let depth = out.depth_mm.map(|d| (d, &g.intrinsics));
        // A frame the engine could not place has no pose to write (run.json counts it, with
        // why); writing its stand-in pose would read as "the camera stood still, tracked". A
        // turning camera's orientation-only poses are written.
        let res = if g.stats.has_pose() {
            self.outputs
                .add_frame(g.index, g.timestamp, g.world_from_cam, depth)
        } else {
            Ok(())
        };
        self.handled_next = self.handled_next.max(out.frame.source_index + 1);
        PendingSnapshot::commit(&self.snapshot, self.handled_next, &self.outputs);
        res
    }

    fn finish(&mut self, end: &RunEnd<'_>) -> Result<()> {
        // Every result the engine made has been through the sinks: the last snapshot can take
        // over.
        PendingSnapshot::commit(&self.snapshot, u64::MAX, &self.outputs);
        let report = self
            .outputs
            .finish(end.cloud, end.intrinsics, end.summary, end.corrected);
        let missing = report.missing();
        if let Ok(mut slot) = self.report.lock() {
            *slot = Some(report);
        }
        missing.map_or(Ok(()), |m| Err(Error::Invalid(m)))
    }
}
