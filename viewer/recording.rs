//! The rerun recording (built with the `rerun` feature, the default).

use super::{paths, FrameLog, RerunTarget, TIMELINE_FRAME, TIMELINE_TIME};
use streamrecon_core::error::{Error, Result};

/// Logs a stream's results to rerun.
pub struct Viewer {
    rec: rerun::RecordingStream,
    trajectory: Vec<[f32; 3]>,
    /// Log the whole trajectory strip every this many frames.
    trajectory_every: u64,
    /// Positions kept for the strip (bounded).
    trajectory_cap: usize,
}

/// Opens a recording for a target; `None` when no flag asked for one.
///
/// # Errors
/// The .rrd cannot be created, the viewer cannot be spawned or reached.
pub fn open(target: &RerunTarget, application: &'static str) -> Result<Option<Viewer>> {
    if !target.is_enabled() {
        return Ok(None);
    }
    let mut builder = rerun::RecordingStreamBuilder::new(application);
    if let Some(id) = &target.recording_id {
        builder = builder.recording_id(id.as_str());
    }
    let rec = if let (Some(path), Some(url)) = (&target.save, &target.connect) {
        // Both: the recording is kept on disk and shown live.
        let file = rerun::sink::FileSink::new(path).map_err(|e| {
            Error::Rerun(format!(
                "cannot save the recording ({e}): {}",
                path.display()
            ))
        })?;
        let uri: rerun::external::re_uri::ProxyUri = url
            .parse()
            .map_err(|e| Error::Rerun(format!("not a viewer URL ({e}): {url}")))?;
        builder
            .set_sinks((file, rerun::sink::GrpcSink::new(uri)))
            .map_err(|e| Error::Rerun(format!("cannot open the recording: {e}")))?
    } else if let Some(path) = &target.save {
        builder.save(path).map_err(|e| {
            Error::Rerun(format!(
                "cannot save the recording ({e}): {}",
                path.display()
            ))
        })?
    } else if let Some(url) = &target.connect {
        builder
            .connect_grpc_opts(url.clone())
            .map_err(|e| Error::Rerun(format!("cannot connect to the viewer ({e}): {url}")))?
    } else if let Some(bind) = &target.serve {
        let (ip, port) = bind
            .rsplit_once(':')
            .and_then(|(ip, p)| p.parse::<u16>().ok().map(|p| (ip.to_string(), p)))
            .ok_or_else(|| Error::Rerun(format!("--serve takes IP:PORT: {bind}")))?;
        builder
            .serve_grpc_opts(ip, port, rerun::ServerOptions::default())
            .map_err(|e| Error::Rerun(format!("cannot serve the recording ({e}): {bind}")))?
    } else {
        builder.spawn().map_err(|e| {
            Error::Rerun(format!(
                "cannot spawn a viewer (is `rerun` on PATH, is there a display?): {e}"
            ))
        })?
    };
    rec.log_static("world", &rerun::ViewCoordinates::RIGHT_HAND_Y_DOWN())
        .map_err(|e| Error::Rerun(e.to_string()))?;
    layout()
        .send(&rec, rerun::blueprint::BlueprintActivation::default())
        .map_err(|e| Error::Rerun(format!("cannot send the layout: {e}")))?;
    Ok(Some(Viewer {
        rec,
        trajectory: Vec::new(),
        trajectory_every: 10,
        trajectory_cap: 5000,
    }))
}

/// The viewer's layout, sent with every recording and live stream: the reconstruction tab (a
/// large 3D view of the map, trajectory and camera with its image; the camera image, depth and
/// flow beside it), the stream's plots in one tab, and the learned engines' memory in another
/// (empty for engines without one).
fn layout() -> rerun::blueprint::Blueprint {
    use rerun::blueprint::{
        ContainerLike, Grid, Horizontal, Spatial2DView, Spatial3DView, Tabs, TimeSeriesView,
        Vertical,
    };
    let plots = |name: &str, paths: &[&str]| -> ContainerLike {
        Grid::new(paths.iter().map(|p| {
            let title = p.trim_start_matches("plot/").replace('_', " ");
            ContainerLike::from(TimeSeriesView::new(title).with_contents([p.to_string()]))
        }))
        .with_name(name)
        .into()
    };
    let image = |name: &str, path: &str| -> ContainerLike {
        Spatial2DView::new(name)
            .with_origin(paths::IMAGE)
            .with_contents([path.to_string()])
            .into()
    };
    let reconstruction = Horizontal::new([
        Spatial3DView::new("map")
            .with_origin("world")
            .with_contents(["world/**".to_string()])
            .into(),
        Vertical::new([
            image("camera", paths::RGB),
            image("depth", paths::DEPTH),
            image("flow", paths::FLOW),
        ])
        .into(),
    ])
    .with_column_shares([3.0, 1.0])
    .with_name("reconstruction");
    rerun::blueprint::Blueprint::new(Tabs::new([
        reconstruction.into(),
        plots(
            "stream",
            &[
                paths::PLOT_FPS,
                paths::PLOT_LATENCY,
                paths::PLOT_MEMORY,
                paths::PLOT_TRACKED,
                paths::PLOT_STABILIZE_MM,
                paths::PLOT_STABILIZE_DEG,
            ],
        ),
        plots(
            "model memory",
            &[
                paths::PLOT_KV_TOKENS,
                paths::PLOT_KV_MIB,
                paths::PLOT_MODEL_MS,
                paths::PLOT_NOVELTY,
                paths::PLOT_ADMITTED,
            ],
        ),
    ]))
}

fn jpeg(bytes: &[u8]) -> rerun::EncodedImage {
    rerun::EncodedImage::from_file_contents(bytes.to_vec())
        .with_media_type(rerun::components::MediaType::JPEG)
}

fn rr(e: impl std::fmt::Display) -> Error {
    Error::Rerun(e.to_string())
}

impl Viewer {
    fn set_time(&self, index: u64, timestamp: f64) {
        self.rec.set_time_sequence(TIMELINE_FRAME, index as i64);
        self.rec.set_duration_secs(TIMELINE_TIME, timestamp);
    }

    /// Logs one frame's camera, images and points.
    ///
    /// # Errors
    /// The recording stream refuses the data.
    pub fn log_frame(&mut self, f: &FrameLog<'_>) -> Result<()> {
        self.set_time(f.index, f.timestamp);
        // A frame without a tracked pose leaves the camera and the trajectory where they were.
        if let Some(cfw) = &f.cam_from_world {
            let t = cfw.translation.vector;
            let q = cfw.rotation.coords;
            self.rec
                .log(
                    paths::CAMERA,
                    &rerun::Transform3D::from_translation_rotation(
                        [t.x as f32, t.y as f32, t.z as f32],
                        rerun::Quaternion::from_xyzw([
                            q.x as f32, q.y as f32, q.z as f32, q.w as f32,
                        ]),
                    )
                    .with_relation(rerun::TransformRelation::ChildFromParent),
                )
                .map_err(rr)?;
        }
        let k = f.intrinsics;
        // rerun puts pixel centres at +0.5; ours sit at integer coordinates.
        self.rec
            .log(
                paths::IMAGE,
                &rerun::Pinhole::new([
                    [k.fx as f32, 0.0, 0.0],
                    [0.0, k.fy as f32, 0.0],
                    [(k.cx + 0.5) as f32, (k.cy + 0.5) as f32, 1.0],
                ])
                .with_resolution([k.width as f32, k.height as f32])
                .with_camera_xyz(rerun::components::ViewCoordinates::RDF),
            )
            .map_err(rr)?;
        self.rec.log(paths::RGB, &jpeg(&f.images.rgb)).map_err(rr)?;
        if let Some(mm) = f.depth_mm {
            if mm.len() == (k.width * k.height) as usize {
                // 16-bit millimetres of engine units: half the bytes of f32, 1e-3 resolution.
                let mm: Vec<u8> = mm.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.rec
                    .log(
                        paths::DEPTH,
                        &rerun::DepthImage::from_gray16(mm, [k.width, k.height]).with_meter(1000.0),
                    )
                    .map_err(rr)?;
            }
        }
        if let Some(fl) = &f.images.flow {
            self.rec.log(paths::FLOW, &jpeg(fl)).map_err(rr)?;
        }
        if !f.points.is_empty() {
            self.rec
                .log(
                    paths::POINTS,
                    &rerun::Points3D::new(f.points.iter().copied())
                        .with_colors(
                            f.colors
                                .iter()
                                .map(|c| rerun::Color::from_rgb(c[0], c[1], c[2])),
                        )
                        .with_radii([0.004f32]),
                )
                .map_err(rr)?;
        }
        if let Some(cfw) = &f.cam_from_world {
            let c = cfw.inverse().translation.vector;
            self.trajectory.push([c.x as f32, c.y as f32, c.z as f32]);
        }
        if self.trajectory.len() > self.trajectory_cap {
            // Keep every other old position: bounded, still shows the whole path.
            let half: Vec<[f32; 3]> = self.trajectory.iter().step_by(2).copied().collect();
            self.trajectory = half;
        }
        if f.index.is_multiple_of(self.trajectory_every) {
            self.rec
                .log(
                    paths::TRAJECTORY,
                    &rerun::LineStrips3D::new([self.trajectory.clone()]),
                )
                .map_err(rr)?;
        }
        Ok(())
    }

    /// Logs the fused map (replacing the one logged before), with normals when it has them.
    ///
    /// # Errors
    /// The recording stream refuses the data.
    pub fn log_map(
        &self,
        points: &[[f32; 3]],
        colors: &[[u8; 3]],
        normals: Option<&[[f32; 3]]>,
    ) -> Result<()> {
        let cloud = rerun::Points3D::new(points.iter().copied())
            .with_colors(
                colors
                    .iter()
                    .map(|c| rerun::Color::from_rgb(c[0], c[1], c[2])),
            )
            .with_radii([0.004f32]);
        self.rec.log(paths::MAP, &cloud).map_err(rr)?;
        if let Some(n) = normals {
            // The normals as short arrows from a sample of the points.
            let step = (points.len() / 20_000).max(1);
            let (origins, vectors): (Vec<[f32; 3]>, Vec<[f32; 3]>) = points
                .iter()
                .zip(n)
                .step_by(step)
                .map(|(p, n)| (*p, n.map(|v| v * 0.02)))
                .unzip();
            self.rec
                .log(
                    format!("{}/normals", paths::MAP),
                    &rerun::Arrows3D::from_vectors(vectors).with_origins(origins),
                )
                .map_err(rr)?;
        }
        Ok(())
    }

    /// Logs the trajectory after loop closure as its own strip (camera centres), green, beside
    /// the online one.
    ///
    /// # Errors
    /// The recording stream refuses the data.
    pub fn log_corrected_trajectory(&self, centres: &[[f32; 3]]) -> Result<()> {
        let strip = rerun::LineStrips3D::new([centres.to_vec()])
            .with_colors([rerun::Color::from_rgb(40, 200, 90)]);
        self.rec
            .log(paths::TRAJECTORY_CORRECTED, &strip)
            .map_err(rr)
    }

    /// Logs a scalar plot value at the current time.
    ///
    /// # Errors
    /// The recording stream refuses the data.
    pub fn log_scalar(&self, path: &str, value: f64) -> Result<()> {
        self.rec
            .log(path, &rerun::Scalars::new([value]))
            .map_err(rr)
    }

    /// Writes what was logged so far to the sink, waiting until it is written.
    ///
    /// # Errors
    /// The sink cannot be flushed.
    pub fn flush(&self) -> Result<()> {
        self.rec.flush_blocking().map_err(rr)
    }

    /// Logs the final trajectory and flushes everything to the sink.
    ///
    /// # Errors
    /// The sink cannot be flushed.
    pub fn finish(&mut self) -> Result<()> {
        if !self.trajectory.is_empty() {
            self.rec
                .log(
                    paths::TRAJECTORY,
                    &rerun::LineStrips3D::new([self.trajectory.clone()]),
                )
                .map_err(rr)?;
        }
        self.rec.flush_blocking().map_err(rr)
    }
}
