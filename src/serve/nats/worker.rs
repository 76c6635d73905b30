//! `streamrecon worker --nats URL`: claims sessions through leases, runs each with the same
//! pipeline as the embedded server (frames from the session's subject, results published to
//! its results subject), and keeps its snapshots in the object store so another worker can
//! take the session over.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use futures_util::StreamExt;
use serde_json::json;

use streamrecon_core::error::{Error, Result};
use streamrecon_pipeline as pipeline;

use super::{
    frames_subject, live_entry, nats_error, read_object, results_subject, sorted_keys, unix_now,
    write_object, Broker, Lease, NatsConfig, RecordingPart, SessionRecord, SessionState,
    SnapshotMeta, WorkerLoad, END_HEADER,
};
use crate::{
    close, frame_headers, ingest, is_recording_part, lock, recording_part, runtime, start_session,
    AppState, ServeConfig, Session, DOWNLOADS,
};

/// How often a worker looks for sessions to claim.
const CLAIM_EVERY: Duration = Duration::from_millis(250);
/// A worker waits this long per session it holds before claiming one, so that the least
/// loaded worker that sees a new session takes it.
const CLAIM_WAIT_PER_SESSION: Duration = Duration::from_millis(25);
/// A session nobody claimed for this long is claimed by any worker with room, loaded or not.
const UNCLAIMED_AFTER: Duration = Duration::from_secs(1);
/// How often a held session's lease is looked at and its snapshot file, at the least (new
/// results are published as they come).
const KEEP_EVERY: Duration = Duration::from_millis(50);
/// Frame numbers and stream sequences remembered per session, to place a snapshot in the
/// stream (a snapshot is never older than this many frames).
const SEQS_KEPT: usize = 100_000;

/// How to run a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub nats: NatsConfig,
    /// The sessions' options (weights the sessions may use), the folder for their working
    /// files, the most sessions held at once and the snapshot cadence.
    pub serve: ServeConfig,
    /// This worker's name in leases.
    pub name: String,
    /// Serve the held sessions' live recordings and the worker's metrics here (token
    /// `serve.token`), for front doors to pass on.
    pub listen: Option<std::net::SocketAddr>,
    /// The URL front doors reach that address by [default: `http://` and the bound address].
    pub advertise: Option<String>,
}

/// Runs a worker until `shutdown` resolves; then hands every held session back with a final
/// snapshot, for another worker to continue.
///
/// # Errors
/// NATS cannot be reached, or the data folder cannot be made.
pub fn run_worker(
    config: &WorkerConfig,
    on_ready: impl FnOnce(Option<&str>),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    streamrecon_core::io_util::create_dir(&config.serve.data_dir)?;
    runtime("worker", 2)?.block_on(async move {
        let broker = Arc::new(Broker::connect(&config.nats, &config.name).await?);
        log::info!("worker {} connected to {}", config.name, config.nats.url);
        let state = Arc::new(AppState {
            config: config.serve.clone(),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let http = match config.listen {
            Some(bind) => Some(serve_http(bind, config.advertise.clone(), state.clone()).await?),
            None => None,
        };
        on_ready(http.as_deref());
        let mut claims = Claims {
            broker,
            state,
            http,
            config,
            stopping: Arc::new(AtomicBool::new(false)),
            held: HashMap::new(),
            closed: HashSet::new(),
            unclosed: Some(BTreeMap::new()),
            announced: None,
        };
        // A new session is claimed as soon as its record is written; the periodic look also
        // finds the sessions whose worker's lease expired. The watch (made beside the loop:
        // the look starts at once) gives every record's last value, then each change.
        let mut changes = watch_sessions(claims.broker.sessions.clone());
        tokio::pin!(shutdown);
        loop {
            claims.held.retain(|_, h| !h.is_finished());
            claims.announce().await;
            if let Err(e) = claims.scan().await {
                log::warn!("{e}");
            }
            loop {
                tokio::select! {
                    () = &mut shutdown => {
                        claims.hand_back().await;
                        return Ok(());
                    }
                    () = tokio::time::sleep(CLAIM_EVERY) => break,
                    change = changes.recv(), if claims.unclosed.is_some() => {
                        let Some((id, record)) = change else {
                            // The watch broke: the look lists the bucket instead.
                            claims.unclosed = None;
                            continue;
                        };
                        claims.held.retain(|_, h| !h.is_finished());
                        if let Some(unclosed) = claims.unclosed.as_mut() {
                            match &record {
                                Some(r) if r.state != SessionState::Closed => {
                                    unclosed.insert(id.clone(), r.clone());
                                }
                                _ => {
                                    unclosed.remove(&id);
                                }
                            }
                        }
                        if let Some(r) = record {
                            claims.offer(id, r).await;
                        }
                    }
                }
            }
        }
    })
}

/// Serves the worker's routes on `bind` in the background; the URL to advertise in leases.
async fn serve_http(
    bind: std::net::SocketAddr,
    advertise: Option<String>,
    state: Arc<AppState>,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| Error::Invalid(format!("cannot listen on {bind}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, crate::worker_router(state)).await {
            log::error!("the worker's HTTP on {addr} stopped: {e}");
        }
    });
    Ok(advertise.unwrap_or_else(|| format!("http://{addr}")))
}

/// Every session record's last value, then each change, as (id, record; `None` when deleted),
/// from a watch on the sessions bucket made in the background; the channel closes if the watch
/// breaks.
fn watch_sessions(
    sessions: async_nats::jetstream::kv::Store,
) -> tokio::sync::mpsc::Receiver<(String, Option<SessionRecord>)> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let made = Instant::now();
        let mut watch = match sessions.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                log::warn!("no watch on the sessions ({e}): listing them every {CLAIM_EVERY:?}");
                return;
            }
        };
        if made.elapsed() > Duration::from_secs(1) {
            log::warn!("the sessions watch took {:?} to start", made.elapsed());
        }
        while let Some(Ok(e)) = watch.next().await {
            let record = if e.operation == async_nats::jetstream::kv::Operation::Put {
                let Ok(r) = serde_json::from_slice(&e.value) else {
                    continue;
                };
                Some(r)
            } else {
                None
            };
            if tx.send((e.key, record)).await.is_err() {
                return;
            }
        }
        log::warn!("the sessions watch ended: listing sessions every {CLAIM_EVERY:?}");
    });
    rx
}

/// The sessions a worker holds, and how it takes more.
struct Claims<'a> {
    broker: Arc<Broker>,
    state: Arc<AppState>,
    config: &'a WorkerConfig,
    /// Where this worker serves its sessions' live recordings, if it does.
    http: Option<String>,
    /// The worker is shutting down: its sessions hand themselves back.
    stopping: Arc<AtomicBool>,
    held: HashMap<String, tokio::task::JoinHandle<()>>,
    /// A closed session never opens again: its record is not read at every look.
    closed: HashSet<String>,
    /// The sessions not closed, as the watch on the sessions bucket says; `None` once it broke
    /// (the look then lists the bucket).
    unclosed: Option<BTreeMap<String, SessionRecord>>,
    /// The load last announced and when.
    announced: Option<(usize, Instant)>,
}

impl Claims<'_> {
    /// Offers every session that is not closed to [`Claims::offer`], up to the worker's room.
    async fn scan(&mut self) -> Result<()> {
        if self.held.len() >= self.config.serve.max_sessions {
            return Ok(());
        }
        if let Some(unclosed) = &self.unclosed {
            let waiting: Vec<(String, SessionRecord)> = unclosed
                .iter()
                .filter(|(id, _)| !self.held.contains_key(*id))
                .map(|(id, r)| (id.clone(), r.clone()))
                .collect();
            for (id, record) in waiting {
                self.offer(id, record).await;
            }
            return Ok(());
        }
        for id in sorted_keys(&self.broker.sessions, "sessions").await? {
            if self.held.len() >= self.config.serve.max_sessions {
                break;
            }
            if self.held.contains_key(&id) || self.closed.contains(&id) {
                continue;
            }
            if let Some((record, _)) = self.broker.record(&id).await? {
                self.offer(id, record).await;
            }
        }
        Ok(())
    }

    /// Takes the session's lease if nobody holds it and the worker has room, and runs it; a
    /// worker holding sessions waits a little first, longer the more it holds.
    async fn offer(&mut self, id: String, record: SessionRecord) {
        if self.held.len() >= self.config.serve.max_sessions || self.held.contains_key(&id) {
            return;
        }
        if record.state == SessionState::Closed {
            self.closed.insert(id);
            return;
        }
        // Held by another worker: not offered (an offer waits by this worker's load).
        if !matches!(self.broker.lease(&id).await, Ok(None)) {
            return;
        }
        let held = u32::try_from(self.held.len()).unwrap_or(u32::MAX);
        if held > 0 {
            // A new session goes to a less loaded worker if one is known (from the leases);
            // one still unclaimed after a while goes to whoever looks (that worker may be gone).
            let young = unix_now() - record.created_unix < UNCLAIMED_AFTER.as_secs_f64();
            if young && self.a_less_loaded_worker().await {
                return;
            }
            tokio::time::sleep(CLAIM_WAIT_PER_SESSION * held).await;
        }
        let lease = Lease {
            worker: self.config.name.clone(),
            http: self.http.clone(),
            ..Lease::default()
        };
        let value = serde_json::to_vec(&lease).unwrap_or_default();
        // Only one worker's create succeeds: the bucket refuses a key that exists.
        let Ok(revision) = self.broker.leases.create(&id, value.into()).await else {
            return;
        };
        log::info!("session {id}: claimed by worker {}", self.config.name);
        // Counted at once, so a burst of new sessions spreads over the workers.
        let task = Held {
            broker: self.broker.clone(),
            state: self.state.clone(),
            id: id.clone(),
            worker: self.config.name.clone(),
            http: self.http.clone(),
            revision,
            claimed_at: revision,
            lease_ttl: self.config.nats.lease_ttl,
            stopping: self.stopping.clone(),
            lost: Arc::new(AtomicBool::new(false)),
            seqs: Arc::new(Mutex::new(VecDeque::new())),
        };
        self.held.insert(id, tokio::spawn(task.run(record)));
        self.announce().await;
    }

    /// Another live worker with room holds fewer sessions than this one (by what the workers
    /// announce; unknown when they cannot be read: then this one claims).
    async fn a_less_loaded_worker(&self) -> bool {
        let Ok(loads) = self.broker.worker_loads().await else {
            return false;
        };
        let mine = self.held.len();
        loads
            .iter()
            .any(|(w, l)| *w != self.config.name && l.held < mine && l.held < l.max)
    }

    /// Announces this worker's load in the workers bucket when it changed, and at least every
    /// third of the lease time (the entry expires after it).
    async fn announce(&mut self) {
        let held = self.held.len();
        let due = self
            .announced
            .is_none_or(|(n, at)| n != held || at.elapsed() >= self.config.nats.lease_ttl / 3);
        if !due {
            return;
        }
        let load = WorkerLoad {
            held,
            max: self.config.serve.max_sessions,
        };
        let value = serde_json::to_vec(&load).unwrap_or_default();
        match self
            .broker
            .workers
            .put(&self.config.name, value.into())
            .await
        {
            Ok(_) => self.announced = Some((held, Instant::now())),
            Err(e) => log::warn!("worker {} not announced: {e}", self.config.name),
        }
    }

    /// Hands every held session back (each stores its final snapshot and deletes its lease).
    async fn hand_back(self) {
        log::info!(
            "worker {} stopping: handing back {} sessions",
            self.config.name,
            self.held.len()
        );
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.broker.workers.delete(&self.config.name).await;
        for (_, h) in self.held {
            let _ = h.await;
        }
    }
}

/// A session this worker holds the lease of.
#[derive(Clone)]
struct Held {
    broker: Arc<Broker>,
    state: Arc<AppState>,
    id: String,
    worker: String,
    http: Option<String>,
    /// The lease's revision: renewing with it fails once another worker has taken the lease.
    revision: u64,
    /// The revision this worker claimed the lease at: it names this worker's recording pieces.
    claimed_at: u64,
    lease_ttl: Duration,
    /// The worker is shutting down: hand the session back.
    stopping: Arc<AtomicBool>,
    /// The lease went to another worker: stop at once, publish nothing more.
    lost: Arc<AtomicBool>,
    /// (frame number, frames-stream sequence) of the frames given to the pipeline.
    seqs: Arc<Mutex<VecDeque<(u64, u64)>>>,
}

/// A snapshot store in flight: its outcome and the recording's shipper it took.
type Storing = tokio::task::JoinHandle<(Result<Option<u64>>, Option<Shipper>)>;

/// How a recording piece's object name starts (after the session id), followed by the
/// claim revision of the worker that wrote it and the piece's number. (A piece stored by a
/// worker that died before the metadata naming it was written stays in the store: listing
/// the store to find such pieces hung at times, async-nats 0.52 with nats-server 2.9.)
const RECORDING_PIECE: &str = "recording-piece-";

/// This worker's part of a session's rerun recording, stored in pieces with each snapshot, so
/// that a worker that dies leaves what it recorded up to its last snapshot.
struct Shipper {
    /// The file the pipeline writes.
    file: PathBuf,
    /// The earlier workers' parts, then this worker's.
    parts: Vec<RecordingPart>,
    /// Bytes of the file stored.
    shipped: u64,
}

impl Shipper {
    /// The parts that have pieces.
    fn shipped_parts(&self) -> Vec<RecordingPart> {
        self.parts
            .iter()
            .filter(|p| !p.pieces.is_empty())
            .cloned()
            .collect()
    }
}

/// A result as published: the worker that made it beside the result's own fields.
#[derive(serde::Serialize)]
struct Published<'a> {
    #[serde(flatten)]
    result: &'a pipeline::FrameResult,
    worker: &'a str,
}

/// How a held session ended on this worker.
enum Ending {
    /// Its client closed it and every frame sent was processed.
    Closed,
    /// The worker is stopping, or the lease was lost.
    HandedBack,
}

impl Held {
    async fn run(self, record: SessionRecord) {
        let id = self.id.clone();
        if let Err(e) = self.hold(record).await {
            log::error!("session {id}: {e}");
        }
        if !self.lost.load(Ordering::SeqCst) {
            // Another worker may take it from its last snapshot.
            let _ = self.broker.leases.delete(&id).await;
        }
        lock(&self.state.sessions).remove(&id);
    }

    async fn hold(&self, record: SessionRecord) -> Result<()> {
        let id = &self.id;
        let dir = self.state.config.data_dir.join(id);
        // The session's files here are a working copy: what counts is in the broker.
        let _ = std::fs::remove_dir_all(&dir);
        streamrecon_core::io_util::create_dir(&dir)?;
        // A snapshot that is there but cannot be read now (a broker that lost a server) is
        // not "no snapshot": the session is handed back, to be taken again, rather than
        // started afresh over frames the stream no longer holds.
        let meta = SnapshotMeta::stored(&self.broker.snapshots, id).await?;
        let (resume, resumed_at, after_seq) = match &meta {
            Some(m) => {
                let snapshot = dir.join(pipeline::SNAPSHOT_FILE);
                let bytes = read_object(&self.broker.snapshots, &m.snapshot).await?;
                std::fs::write(&snapshot, bytes).map_err(|e| Error::io(&snapshot, e))?;
                let ckpt = dir.join(pipeline::CHECKPOINT_FILE);
                let bytes = read_object(&self.broker.snapshots, &m.checkpoint).await?;
                std::fs::write(&ckpt, bytes).map_err(|e| Error::io(&ckpt, e))?;
                if let Some(name) = &m.cloud {
                    let cloud = dir.join(pipeline::CLOUD_FILE);
                    let bytes = read_object(&self.broker.snapshots, name).await?;
                    std::fs::write(&cloud, bytes).map_err(|e| Error::io(&cloud, e))?;
                }
                log::info!(
                    "session {id}: resuming at frame {} (frames after stream sequence {})",
                    m.next,
                    m.after_seq
                );
                (Some(snapshot), Some(m.next), m.after_seq)
            }
            None => (None, None, 0),
        };
        // The earlier workers' recording parts hold their names in the folder (filled in at
        // close), so this worker's recording is the next part.
        let earlier = meta.map(|m| m.recordings).unwrap_or_default();
        for part in &earlier {
            let path = dir.join(&part.name);
            std::fs::write(&path, b"").map_err(|e| Error::io(&path, e))?;
        }
        let started = {
            let (state, id, dir, req) = (
                self.state.clone(),
                id.clone(),
                dir.clone(),
                record.request.clone(),
            );
            tokio::task::spawn_blocking(move || {
                start_session(&state, &id, &dir, &req, resume, resumed_at)
            })
            .await
            .map_err(|e| Error::Invalid(e.to_string()))?
        };
        if let Err(e) = started {
            // The request itself cannot run (checked by the front door, but options such as
            // weights are this worker's): the session ends with the reason.
            self.set_closed(Some(json!({ "error": e.1 }))).await?;
            return Err(Error::Invalid(format!("does not start: {}", e.1)));
        }
        let session = self.state.session(id).map_err(|e| Error::Invalid(e.1))?;
        let recording = session.recording.clone().map(|file| {
            let mut parts = earlier.clone();
            parts.push(RecordingPart {
                name: file
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().to_string()),
                pieces: Vec::new(),
            });
            Shipper {
                file,
                parts,
                shipped: 0,
            }
        });
        let done = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(self.clone().keep(
            session.clone(),
            dir.clone(),
            resumed_at,
            recording,
            done.clone(),
        ));
        let ending = self
            .feed(&session, resumed_at.unwrap_or(0), after_seq)
            .await;
        // Ends the pipeline: the frames given to it are processed, its outputs written (with a
        // final snapshot).
        let summary = {
            let s = session.clone();
            tokio::task::spawn_blocking(move || close(&s))
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?
        };
        done.store(true, Ordering::SeqCst);
        session.newest.send_modify(|_| {});
        log::debug!("session {id}: pipeline closed");
        let _ = keeper.await;
        log::debug!("session {id}: last results and snapshot stored");
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::Invalid(
                "lease lost to another worker: stopped without publishing".into(),
            ));
        }
        match ending? {
            Ending::HandedBack => {
                log::info!("session {id}: handed back");
                Ok(())
            }
            Ending::Closed => {
                self.join_parts(&dir, &earlier).await;
                let mut summary = summary;
                let recordings = self.upload_outputs(&dir).await;
                log::debug!("session {id}: outputs stored");
                if !recordings.is_empty() {
                    // One part per worker that ran the session, in order.
                    summary["recordings"] = json!(recordings);
                }
                self.set_closed(Some(summary)).await?;
                log::debug!("session {id}: record closed");
                // Nothing is replayed any more.
                let _ = self.broker.frames.purge().filter(frames_subject(id)).await;
                log::debug!("session {id}: frames purged");
                self.delete_snapshot().await;
                log::info!("session {id}: closed");
                Ok(())
            }
        }
    }

    /// Gives the session's frames from the stream to its pipeline, from `after_seq` on, until
    /// the end marker, a lost lease or the worker's shutdown.
    async fn feed(&self, s: &Session, mut index: u64, after_seq: u64) -> Result<Ending> {
        let id = &self.id;
        let consumer = self
            .broker
            .frames
            .create_consumer(pull::OrderedConfig {
                filter_subject: frames_subject(id),
                deliver_policy: if after_seq > 0 {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: after_seq + 1,
                    }
                } else {
                    DeliverPolicy::All
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error(&format!("session {id}'s frames"), e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| nats_error(&format!("session {id}'s frames"), e))?;
        loop {
            if self.lost.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
                return Ok(Ending::HandedBack);
            }
            let next = tokio::time::timeout(Duration::from_millis(200), messages.next()).await;
            let msg = match next {
                Err(_) => continue,
                Ok(None) => return Err(nats_error(&format!("session {id}'s frames"), "ended")),
                Ok(Some(Err(e))) => {
                    return Err(nats_error(&format!("session {id}'s frames"), e));
                }
                Ok(Some(Ok(m))) => m,
            };
            let seq = msg.info().map_or(0, |i| i.stream_sequence);
            let headers = msg.headers.clone().unwrap_or_default();
            if headers.get(END_HEADER).is_some() {
                return Ok(Ending::Closed);
            }
            let meta = frame_headers(|name| headers.get(name).map(async_nats::HeaderValue::as_str));
            let ingested = match meta {
                Ok((raw, timestamp)) => ingest(s, msg.payload.clone(), raw, timestamp).await,
                Err(e) => Err(e),
            };
            match ingested {
                Ok(_) => {
                    let mut seqs = lock(&self.seqs);
                    if seqs.len() == SEQS_KEPT {
                        seqs.pop_front();
                    }
                    seqs.push_back((index, seq));
                    index += 1;
                }
                // The client got its answer at upload; a frame that does not decode is
                // said on the results subject (WebSocket clients see it) and logged.
                Err(e) => {
                    log::warn!(
                        "session {id}: frame at stream sequence {seq} refused: {}",
                        e.1
                    );
                    let payload = json!({ "error": e.1, "stream_seq": seq }).to_string();
                    let msg = PublishMessage::build()
                        .payload(payload.into())
                        .message_id(format!("{id}.e{seq}"));
                    if let Ok(ack) = self.broker.js.send_publish(results_subject(id), msg).await {
                        let _ = ack.await;
                    }
                }
            }
        }
    }

    /// Beside the feed: renews the lease (with the session's counts), publishes new results
    /// and stores each new snapshot, until `done`; then publishes the last results and stores
    /// the final snapshot.
    async fn keep(
        mut self,
        s: Arc<Session>,
        dir: PathBuf,
        resumed_at: Option<u64>,
        mut recording: Option<Shipper>,
        done: Arc<AtomicBool>,
    ) {
        let mut published = 0u64;
        // The first renewal at once: the lease then says where the session resumed.
        let mut renewed = Instant::now()
            .checked_sub(self.lease_ttl)
            .unwrap_or_else(Instant::now);
        let mut stored_next = resumed_at;
        let mut snapshot_seen = None;
        // A snapshot being stored, beside this loop: results and lease renewals go on meanwhile
        // (a recording's piece can take seconds to store).
        let mut storing: Option<(Storing, Option<std::time::SystemTime>)> = None;
        let mut newest = s.newest.subscribe();
        loop {
            let last = done.load(Ordering::SeqCst);
            if renewed.elapsed() >= self.lease_ttl / 3 || last {
                if !self.renew(&s, resumed_at).await {
                    self.lost.store(true, Ordering::SeqCst);
                    log::error!("session {}: lease lost", self.id);
                    if let Some((h, _)) = storing {
                        h.abort();
                    }
                    return;
                }
                renewed = Instant::now();
            }
            // Seen before the ring is read: a result put in after it ends the wait below.
            newest.borrow_and_update();
            published = self.publish_results(&s, published).await;
            // At the last turn the store in flight is waited for, then the final one.
            for turn in 0..if last { 2 } else { 1 } {
                if let Some((h, seen)) = storing.take_if(|(h, _)| h.is_finished() || last) {
                    if let Some(next) = self.stored(h, &mut recording).await {
                        stored_next = next;
                        snapshot_seen = seen;
                    }
                }
                let modified = std::fs::metadata(dir.join(pipeline::SNAPSHOT_FILE))
                    .and_then(|m| m.modified())
                    .ok();
                if turn == 0 && storing.is_none() && modified.is_some() && modified != snapshot_seen
                {
                    let (held, dir, mut rec) = (self.clone(), dir.clone(), recording.take());
                    let h = tokio::spawn(async move {
                        let r = held.store_snapshot(&dir, stored_next, rec.as_mut()).await;
                        (r, rec)
                    });
                    storing = Some((h, modified));
                }
            }
            if last {
                return;
            }
            let _ = tokio::time::timeout(KEEP_EVERY, newest.changed()).await;
        }
    }

    /// The end of a snapshot store [`Held::keep`] started: the recording's shipper back, and
    /// the frame the stored snapshot continues at (`None`: not stored, said in the log).
    async fn stored(&self, h: Storing, recording: &mut Option<Shipper>) -> Option<Option<u64>> {
        match h.await {
            Ok((result, rec)) => {
                *recording = rec;
                result
                    .map_err(|e| log::warn!("session {}: snapshot not stored: {e}", self.id))
                    .ok()
            }
            Err(e) => {
                log::error!("session {}: snapshot store failed: {e}", self.id);
                None
            }
        }
    }

    /// Renews the lease; false when another worker holds it now.
    async fn renew(&mut self, s: &Session, resumed_at: Option<u64>) -> bool {
        let n = s.counters.get();
        let lease = Lease {
            worker: self.worker.clone(),
            resumed_at,
            frames_received: n.received,
            frames_processed: n.processed,
            frames_dropped: n.dropped(),
            http: self.http.clone(),
        };
        let value: axum::body::Bytes = serde_json::to_vec(&lease).unwrap_or_default().into();
        match self
            .broker
            .leases
            .update(&self.id, value.clone(), self.revision)
            .await
        {
            Ok(r) => {
                self.revision = r;
                true
            }
            // Expired with nobody else taking it (a stall longer than the lease): take it again.
            Err(_) => match self.broker.leases.create(&self.id, value).await {
                Ok(r) => {
                    log::warn!("session {}: lease had expired; taken again", self.id);
                    self.revision = r;
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// Publishes the results made since the one numbered `after`; returns the last one
    /// published. Each carries an id (session, frame, pending or final), so the stream drops
    /// the ones a resumed session makes again.
    async fn publish_results(&self, s: &Session, after: u64) -> u64 {
        // The ring is in `seq` order: the new ones are at its end.
        let mut new: Vec<pipeline::FrameResult> = lock(&s.results)
            .iter()
            .rev()
            .take_while(|r| r.seq > after)
            .cloned()
            .collect();
        new.reverse();
        let mut last = after;
        let mut acks = Vec::new();
        for r in &new {
            let Ok(payload) = serde_json::to_vec(&Published {
                result: r,
                worker: &self.worker,
            }) else {
                continue;
            };
            let kind = if r.pending { "p" } else { "f" };
            let msg = PublishMessage::build()
                .payload(payload.into())
                .message_id(format!("{}.{}.{kind}", self.id, r.index));
            match self
                .broker
                .js
                .send_publish(results_subject(&self.id), msg)
                .await
            {
                Ok(ack) => acks.push((r.seq, ack)),
                Err(e) => {
                    log::warn!("session {}: results not published: {e}", self.id);
                    break;
                }
            }
        }
        for (seq, ack) in acks {
            if ack.await.is_err() {
                break;
            }
            last = seq;
        }
        last
    }

    /// Stores the snapshot in the session's folder (and the checkpoint beside it) under names
    /// of their own, and the recording written since the last one, then the metadata naming
    /// them, then removes the previous snapshot; returns the frame the stored snapshot
    /// continues at.
    async fn store_snapshot(
        &self,
        dir: &Path,
        stored_next: Option<u64>,
        recording: Option<&mut Shipper>,
    ) -> Result<Option<u64>> {
        let id = &self.id;
        // Read once: the pipeline puts a newer snapshot in place by renaming, which leaves the
        // file opened here whole.
        let snap = dir.join(pipeline::SNAPSHOT_FILE);
        let bytes = std::fs::read(&snap).map_err(|e| Error::io(&snap, e))?;
        let next = streamrecon_geometry::snapshot_next_frame_in(&bytes, &snap)
            .ok_or_else(|| Error::Invalid(format!("{}: no frame number", snap.display())))?;
        if Some(next) == stored_next {
            return Ok(stored_next);
        }
        // The checkpoint is rewritten before a snapshot is put in place: it is at least as new.
        let ckpt = dir.join(pipeline::CHECKPOINT_FILE);
        let checkpoint = std::fs::read(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
        let after_seq = if next == 0 {
            0
        } else {
            let seqs = lock(&self.seqs);
            seqs.iter()
                .find(|(i, _)| *i == next - 1)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    Error::Invalid(format!("frame {} is not among the frames fed", next - 1))
                })?
        };
        // The cloud is saved before the snapshot is put in place: one saved at the same frame
        // goes with it (an older one does not).
        let cloud = std::fs::read(dir.join(pipeline::CLOUD_FILE))
            .ok()
            .filter(|b| streamrecon_pipeline::fusion::Fusion::saved_at(b) == Some(next));
        let mut meta = SnapshotMeta::at(id, next, after_seq, cloud.is_some());
        if let Some(r) = recording {
            // The recording was flushed before the snapshot was put in place: it holds every
            // frame before `next`. One that cannot be stored now does not hold the snapshot
            // back; what was not stored goes with the next one.
            if let Err(e) = self.ship(r).await {
                log::warn!("session {id}: recording not stored with the snapshot: {e}");
            }
            meta.recordings = r.shipped_parts();
        }
        let store = &self.broker.snapshots;
        write_object(store, &meta.snapshot, &bytes).await?;
        write_object(store, &meta.checkpoint, &checkpoint).await?;
        if let (Some(name), Some(b)) = (&meta.cloud, &cloud) {
            write_object(store, name, b).await?;
        }
        let m = serde_json::to_vec(&meta).unwrap_or_default();
        write_object(store, &SnapshotMeta::name(id), &m).await?;
        if let Some(old) = stored_next {
            SnapshotMeta::at(id, old, 0, true)
                .delete_objects(store)
                .await;
        }
        // The frames before the snapshot are never replayed: the stream lets them go.
        let _ = self
            .broker
            .frames
            .purge()
            .filter(frames_subject(id))
            .sequence(after_seq + 1)
            .await;
        log::debug!("session {id}: snapshot at frame {next} stored");
        Ok(Some(next))
    }

    /// Stores what the pipeline wrote of this worker's recording since the last piece, up to
    /// its last whole message, as the part's next piece.
    async fn ship(&self, r: &mut Shipper) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut bytes = Vec::new();
        let read = async {
            let mut f = tokio::fs::File::open(&r.file).await?;
            f.seek(std::io::SeekFrom::Start(r.shipped)).await?;
            f.read_to_end(&mut bytes).await
        };
        read.await.map_err(|e| Error::io(&r.file, e))?;
        let whole = streamrecon_viewer::rrd_whole_len(&bytes, r.shipped);
        let Some(part) = r.parts.last_mut().filter(|_| whole > 0) else {
            return Ok(());
        };
        let name = format!(
            "{}/{RECORDING_PIECE}{}-{}",
            self.id,
            self.claimed_at,
            part.pieces.len()
        );
        log::debug!("{name}: {whole} bytes");
        write_object(&self.broker.snapshots, &name, &bytes[..whole]).await?;
        log::debug!("{name} stored");
        part.pieces.push(name);
        r.shipped += whole as u64;
        Ok(())
    }

    /// Writes the earlier workers' recording parts into the folder from their pieces (over
    /// their placeholders), for [`Held::upload_outputs`], a piece at a time. A part that cannot
    /// be read whole is left out (logged) rather than stored cut.
    async fn join_parts(&self, dir: &Path, parts: &[RecordingPart]) {
        use tokio::io::AsyncWriteExt;
        for part in parts {
            let path = dir.join(&part.name);
            let mut file = match tokio::fs::File::create(&path).await {
                Ok(f) => f,
                Err(e) => {
                    log::error!("session {}: {} left out: {e}", self.id, path.display());
                    continue;
                }
            };
            let mut written = Ok(());
            for piece in &part.pieces {
                written = match read_object(&self.broker.snapshots, piece).await {
                    Ok(b) => file.write_all(&b).await.map_err(|e| Error::io(&path, e)),
                    Err(e) => Err(e),
                };
                if written.is_err() {
                    break;
                }
            }
            // tokio's file finishes its last write in the background unless flushed.
            if written.is_ok() {
                written = file.flush().await.map_err(|e| Error::io(&path, e));
            }
            if let Err(e) = written {
                log::error!("session {}: {} left out: {e}", self.id, part.name);
                drop(file);
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
    }

    /// Deletes the session's stored snapshot: the files its metadata names (the recording's
    /// pieces among them), then the metadata.
    async fn delete_snapshot(&self) {
        let store = &self.broker.snapshots;
        if let Ok(Some(m)) = SnapshotMeta::stored(store, &self.id).await {
            m.delete_objects(store).await;
        }
        let _ = store.delete(SnapshotMeta::name(&self.id)).await;
    }

    /// The session's files into the outputs store (`<id>/<name>`); returns the recording's
    /// parts stored, in order.
    async fn upload_outputs(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = DOWNLOADS.iter().map(|n| (*n).to_string()).collect();
        // A resumed session's recording continues in recording-N.rrd.
        let mut parts: Vec<(u32, String)> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter_map(|n| Some((recording_part(&n)?, n)))
                    .collect()
            })
            .unwrap_or_default();
        parts.sort();
        names.extend(parts.into_iter().map(|(_, n)| n));
        let mut recordings = Vec::new();
        for name in names {
            // Read as it is stored: a long session's recording is gigabytes.
            let Ok(mut file) = tokio::fs::File::open(dir.join(&name)).await else {
                continue;
            };
            let key = format!("{}/{name}", self.id);
            let stored = self
                .broker
                .outputs
                .put(key.as_str(), &mut file)
                .await
                .map(|_| ())
                .map_err(|e| nats_error(&format!("object {key}"), e));
            match stored {
                Ok(()) if name == "recording.rrd" || is_recording_part(&name) => {
                    recordings.push(name);
                }
                Ok(()) => {}
                Err(e) => log::error!("session {}: {name} not stored: {e}", self.id),
            }
        }
        recordings
    }

    /// Marks the session closed in its record, with its summary.
    async fn set_closed(&self, summary: Option<serde_json::Value>) -> Result<()> {
        let Some(e) = live_entry(&self.broker.sessions, &self.id).await? else {
            return Ok(());
        };
        let Ok(mut record) = serde_json::from_slice::<SessionRecord>(&e.value) else {
            return Ok(());
        };
        record.state = SessionState::Closed;
        record.summary = summary;
        let v = serde_json::to_vec(&record).unwrap_or_default();
        self.broker
            .sessions
            .put(&self.id, v.into())
            .await
            .map_err(|e| nats_error(&format!("session {}'s record", self.id), e))?;
        Ok(())
    }
}
