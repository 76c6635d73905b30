//! Serving on NATS JetStream: front doors that keep no session state (`serve --nats`) and
//! workers that hold sessions through leases (`worker --nats`). A session's frames and results
//! travel as subjects of two JetStream streams; its record (request, state, summary) lives in
//! one key-value bucket and its lease in another, whose entries expire unless renewed, fenced
//! by revision; engine snapshots and a closed session's outputs live in object stores. How it
//! scales and what is lost when: docs/nats.md.

mod door;
mod worker;

pub use door::serve_door;
pub use worker::{run_worker, WorkerConfig};

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use streamrecon_core::error::{Error, Result};

use super::session::CreateSession;

/// Frames of every session, subject `sr.frames.<id>`.
const FRAMES_STREAM: &str = "SR_FRAMES";
/// Results of every session, subject `sr.results.<id>`.
const RESULTS_STREAM: &str = "SR_RESULTS";
/// Session records: key = session id, value = [`SessionRecord`].
const SESSIONS_BUCKET: &str = "sr_sessions";
/// Leases: key = session id, value = [`Lease`]; entries expire after the lease time.
const LEASES_BUCKET: &str = "sr_leases";
/// Workers: key = worker name, value = [`WorkerLoad`]; entries expire after the lease time
/// unless the worker announces itself again.
const WORKERS_BUCKET: &str = "sr_workers";
/// Engine snapshots and trajectory checkpoints of running sessions.
const SNAPSHOTS_BUCKET: &str = "sr_snapshots";
/// A closed session's files (`<id>/trajectory.txt`, …).
const OUTPUTS_BUCKET: &str = "sr_outputs";
/// Header of the message that ends a session's frames.
const END_HEADER: &str = "sr-end";
/// How long a result's id stays known to the results stream, so one republished by a worker
/// that resumed a session (frames after its snapshot run again) is dropped as a duplicate.
const RESULT_DEDUP_WINDOW: Duration = Duration::from_mins(30);

fn frames_subject(id: &str) -> String {
    format!("sr.frames.{id}")
}

fn results_subject(id: &str) -> String {
    format!("sr.results.{id}")
}

/// How to reach the NATS server, and the shared settings the first process to connect gives
/// the streams and buckets.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` (or `tls://…`; a comma-separated list for a cluster).
    pub url: String,
    /// Token authentication.
    pub token: Option<String>,
    /// NKey seed (`SU…`) authentication.
    pub nkey_seed: Option<String>,
    /// Require TLS to the server.
    pub tls: bool,
    /// A PEM file of certificate authorities to trust for the server's certificate, besides
    /// the system's.
    pub ca: Option<std::path::PathBuf>,
    /// A lease not renewed for this long expires and another worker takes the session over.
    pub lease_ttl: Duration,
    /// Bytes of frames the broker keeps for all sessions; a frame beyond them is refused
    /// (the client is told to retry) rather than an older one dropped.
    pub frames_max_bytes: i64,
    /// Copies a JetStream cluster keeps of every stream, bucket and object store (1 for one
    /// server; 3 in a cluster of three survives the loss of one server).
    pub replicas: usize,
}

/// A session's state in its record.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum SessionState {
    /// Taking frames.
    Open,
    /// Its client closed it: the worker finishes the frames sent and writes the outputs.
    Closing,
    /// Outputs written (in the outputs store), summary in the record.
    Closed,
}

/// What the sessions bucket holds for a session.
#[derive(Serialize, Deserialize, Clone)]
struct SessionRecord {
    request: CreateSession,
    state: SessionState,
    created_unix: f64,
    /// run.json's body once closed (or `{"error": …}`).
    #[serde(default)]
    summary: Option<serde_json::Value>,
}

/// What the leases bucket holds for a held session: who holds it and its counts, renewed
/// every third of the lease time.
#[derive(Serialize, Deserialize, Clone, Default)]
struct Lease {
    worker: String,
    /// The frame number the worker continued at (a resumed session), if any.
    resumed_at: Option<u64>,
    frames_received: u64,
    frames_processed: u64,
    frames_dropped: u64,
    /// Where the worker serves the session's live recording (`worker --bind`), if it does.
    #[serde(default)]
    http: Option<String>,
}

/// What the workers bucket holds for a live worker: how many sessions it holds and may hold.
#[derive(Serialize, Deserialize, Clone, Copy, Default)]
struct WorkerLoad {
    held: usize,
    max: usize,
}

/// Where a session's last snapshot is: the snapshot store's `<id>/snapshot.json`, written
/// after the files it names, so a worker that resumes never reads half a snapshot.
#[derive(Serialize, Deserialize, Clone)]
struct SnapshotMeta {
    /// The frame the snapshot continues at.
    next: u64,
    /// The frames stream's sequence of frame `next - 1`: replay starts after it.
    after_seq: u64,
    snapshot: String,
    checkpoint: String,
    /// The fused cloud saved with the snapshot, if the pipeline saved one.
    #[serde(default)]
    cloud: Option<String>,
    /// The session's recording as far as the snapshot: one part per worker that ran it, in
    /// order (stored in pieces, joined when the session closes).
    #[serde(default)]
    recordings: Vec<RecordingPart>,
}

/// One worker's part of a session's rerun recording, in the snapshot store as it was written.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct RecordingPart {
    /// Its file among the session's outputs (`recording.rrd`, `recording-1.rrd`, …).
    name: String,
    /// Its pieces' object names, in order: the file is their concatenation.
    pieces: Vec<String>,
}

impl SnapshotMeta {
    /// The objects of session `id`'s snapshot at `next` (with its cloud if `cloud`).
    fn at(id: &str, next: u64, after_seq: u64, cloud: bool) -> Self {
        Self {
            next,
            after_seq,
            snapshot: format!("{id}/snapshot-{next}.safetensors"),
            checkpoint: format!("{id}/checkpoint-{next}.json"),
            cloud: cloud.then(|| format!("{id}/cloud-{next}.bin")),
            recordings: Vec::new(),
        }
    }

    /// The name of session `id`'s metadata, which names its stored snapshot.
    fn name(id: &str) -> String {
        format!("{id}/snapshot.json")
    }

    /// Session `id`'s stored snapshot, if it has one.
    ///
    /// # Errors
    /// There is one, but it cannot be read now.
    async fn stored(store: &object_store::ObjectStore, id: &str) -> Result<Option<Self>> {
        let name = Self::name(id);
        read_object_if_any(store, &name)
            .await?
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| nats_error(&format!("object {name}"), e))
            })
            .transpose()
    }

    /// Deletes the objects it names, the recording's pieces among them (not the metadata).
    async fn delete_objects(&self, store: &object_store::ObjectStore) {
        for name in [&self.snapshot, &self.checkpoint]
            .into_iter()
            .chain(&self.cloud)
            .chain(self.recordings.iter().flat_map(|p| &p.pieces))
        {
            let _ = store.delete(name).await;
        }
    }
}

/// The streams and buckets, made if missing.
struct Broker {
    js: jetstream::Context,
    frames: stream::Stream,
    results: stream::Stream,
    sessions: kv::Store,
    leases: kv::Store,
    workers: kv::Store,
    snapshots: object_store::ObjectStore,
    outputs: object_store::ObjectStore,
    /// The server's largest message, bytes.
    max_payload: usize,
}

fn nats_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("NATS: {what}: {e}"))
}

impl Broker {
    async fn connect(cfg: &NatsConfig, name: &str) -> Result<Self> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .require_tls(cfg.tls);
        if let Some(t) = &cfg.token {
            opts = opts.token(t.clone());
        }
        if let Some(seed) = &cfg.nkey_seed {
            opts = opts.nkey(seed.clone());
        }
        if let Some(ca) = &cfg.ca {
            if !ca.is_file() {
                return Err(Error::io(
                    ca,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
            opts = opts.add_root_certificates(ca.clone());
        }
        // A cluster is a comma-separated list: the client tries them and moves to another
        // when its server goes.
        let servers = cfg
            .url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| nats_error(&format!("the server list {}", cfg.url), e))?;
        let client = opts
            .connect(servers)
            .await
            .map_err(|e| nats_error(&format!("cannot connect to {}", cfg.url), e))?;
        let max_payload = client.server_info().max_payload;
        let js = jetstream::new(client);
        let frames = js
            .get_or_create_stream(stream::Config {
                name: FRAMES_STREAM.into(),
                subjects: vec!["sr.frames.*".into()],
                max_bytes: cfg.frames_max_bytes,
                // A full stream refuses new frames (the upload answers 503) instead of
                // dropping frames a session has not read yet.
                discard: stream::DiscardPolicy::New,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error("the frames stream", e))?;
        let results = js
            .get_or_create_stream(stream::Config {
                name: RESULTS_STREAM.into(),
                subjects: vec!["sr.results.*".into()],
                max_age: Duration::from_hours(24),
                duplicate_window: RESULT_DEDUP_WINDOW,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error("the results stream", e))?;
        let sessions = key_value(&js, SESSIONS_BUCKET, Duration::ZERO, cfg.replicas).await?;
        let leases = key_value(&js, LEASES_BUCKET, cfg.lease_ttl, cfg.replicas).await?;
        let workers = key_value(&js, WORKERS_BUCKET, cfg.lease_ttl, cfg.replicas).await?;
        let snapshots = objects(&js, SNAPSHOTS_BUCKET, cfg.replicas).await?;
        let outputs = objects(&js, OUTPUTS_BUCKET, cfg.replicas).await?;
        Ok(Self {
            js,
            frames,
            results,
            sessions,
            leases,
            workers,
            snapshots,
            outputs,
            max_payload,
        })
    }

    /// A session's record and its revision.
    async fn record(&self, id: &str) -> Result<Option<(SessionRecord, u64)>> {
        let Some(e) = live_entry(&self.sessions, id).await? else {
            return Ok(None);
        };
        let r = serde_json::from_slice(&e.value)
            .map_err(|err| nats_error(&format!("session {id}'s record"), err))?;
        Ok(Some((r, e.revision)))
    }

    /// The live workers and their loads (by the workers bucket: each announces itself).
    async fn worker_loads(&self) -> Result<Vec<(String, WorkerLoad)>> {
        let names = sorted_keys(&self.workers, "workers").await?;
        let mut out = Vec::new();
        for name in names {
            if let Some(e) = live_entry(&self.workers, &name).await? {
                if let Ok(load) = serde_json::from_slice(&e.value) {
                    out.push((name, load));
                }
            }
        }
        Ok(out)
    }

    /// Who holds a session, if anyone.
    async fn lease(&self, id: &str) -> Result<Option<Lease>> {
        Ok(live_entry(&self.leases, id)
            .await?
            .and_then(|e| serde_json::from_slice(&e.value).ok()))
    }
}

/// A bucket's keys, sorted (`what` names the bucket in an error).
async fn sorted_keys(store: &kv::Store, what: &str) -> Result<Vec<String>> {
    let listing = |e: &dyn std::fmt::Display| nats_error(&format!("listing {what}"), e);
    let mut keys = store.keys().await.map_err(|e| listing(&e))?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        out.push(k.map_err(|e| listing(&e))?);
    }
    out.sort();
    Ok(out)
}

/// An object's bytes.
async fn read_object(store: &object_store::ObjectStore, name: &str) -> Result<Vec<u8>> {
    read_object_if_any(store, name)
        .await?
        .ok_or_else(|| nats_error(&format!("object {name}"), "not found"))
}

/// An object's bytes; `None` when there is no such object (an error when it cannot be read).
async fn read_object_if_any(
    store: &object_store::ObjectStore,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut obj = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(nats_error(&format!("object {name}"), e)),
    };
    let mut out = Vec::new();
    obj.read_to_end(&mut out)
        .await
        .map_err(|e| nats_error(&format!("object {name}"), e))?;
    Ok(Some(out))
}

async fn write_object(store: &object_store::ObjectStore, name: &str, bytes: &[u8]) -> Result<()> {
    let mut reader = bytes;
    store
        .put(name, &mut reader)
        .await
        .map_err(|e| nats_error(&format!("object {name}"), e))?;
    Ok(())
}

/// An entry that is there (not deleted or purged).
async fn live_entry(store: &kv::Store, key: &str) -> Result<Option<kv::Entry>> {
    let e = store
        .entry(key)
        .await
        .map_err(|e| nats_error(&format!("key {key}"), e))?;
    Ok(e.filter(|e| e.operation == kv::Operation::Put))
}

async fn key_value(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(s) = js.get_key_value(bucket).await {
        return Ok(s);
    }
    // The bucket's stream as the client's `create_key_value` makes it; that call first reads
    // the account's info, which nats-server 2.9's answer lacks fields for.
    js.create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_error(&format!("bucket {bucket}"), e))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| nats_error(&format!("bucket {bucket}"), e))
}

async fn objects(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<object_store::ObjectStore> {
    if let Ok(s) = js.get_object_store(bucket).await {
        return Ok(s);
    }
    js.create_object_store(object_store::Config {
        bucket: bucket.into(),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_error(&format!("object store {bucket}"), e))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
