//! `streamrecon serve`: the network service's flags; `streamrecon view`: one recording in the
//! browser.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use streamrecon::pipeline::RunOptions;

#[derive(Args)]
pub(super) struct ServeArgs {
    /// Address to listen on (loopback unless told otherwise; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7878")]
    bind: std::net::SocketAddr,
    /// File holding the bearer token; without it a random token is made and written to
    /// DATA_DIR/token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Most sessions running at once.
    #[arg(long, default_value_t = 4)]
    max_sessions: usize,
    /// Where sessions write their outputs.
    #[arg(long, default_value = "streamrecon-sessions")]
    data_dir: PathBuf,
    #[command(flatten)]
    models: ModelFileArgs,
    /// A camera or stream URL sessions may read on the server (`{"source": …}`): exact, or a
    /// prefix ending in `*` (`camera:*`, `rtsp://10.0.0.5/*`). Repeatable; none by default.
    #[arg(long, value_name = "SOURCE")]
    allow_source: Vec<String>,
    /// Snapshot each session's engine (vggt) and trajectory every N frames, so a killed server
    /// loses at most N frames of a session.
    #[arg(long, value_name = "N", default_value_t = streamrecon::serve::SNAPSHOT_EVERY)]
    snapshot_every: u64,
    /// Also stream every session to a running rerun viewer.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "rerun+http://127.0.0.1:9876/proxy")]
    connect: Option<String>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// The model files a service's sessions may use (`serve`, `worker`).
#[derive(Args)]
pub(super) struct ModelFileArgs {
    /// StreamVGGT weights sessions may use (`{"geometry": "vggt"}`); each such session loads
    /// its own copy.
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Model config JSON for --weights [default: the official VGGT-1B sizes].
    #[arg(long, value_name = "JSON")]
    model_config: Option<PathBuf>,
    /// Learned flow weights sessions may use: VideoFlow-MOF for `{"flow": "videoflow"}` or
    /// StreamFlow for `{"flow": "streamflow"}` (a session naming the other model fails to load
    /// them, with the loader's message).
    #[arg(long, value_name = "PATH")]
    flow_weights: Option<PathBuf>,
    /// That model's config JSON for --flow-weights [default: the released sizes].
    #[arg(long, value_name = "JSON")]
    flow_config: Option<PathBuf>,
}

impl ModelFileArgs {
    /// The options sessions start from: these files, every other option its default.
    fn options(&self) -> RunOptions {
        RunOptions {
            weights: self.weights.clone(),
            model_config: self.model_config.clone(),
            flow_weights: self.flow_weights.clone(),
            flow_config: self.flow_config.clone(),
            ..RunOptions::default()
        }
    }
}

/// Where the NATS server is and how to log in to it (`serve --nats`, `worker`).
#[derive(Args)]
pub(super) struct NatsArgs {
    /// Serve through NATS JetStream at this URL (`nats://host:4222`, `tls://…`; comma-separated
    /// for a cluster): a front door that keeps no session state, sessions run by `streamrecon
    /// worker`s (docs/nats.md).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// File holding the NATS token.
    #[arg(long, value_name = "FILE")]
    nats_token_file: Option<PathBuf>,
    /// File holding an NKey seed (`SU…`) to log in to NATS with.
    #[arg(long, value_name = "FILE")]
    nats_nkey_file: Option<PathBuf>,
    /// Require TLS to the NATS server.
    #[arg(long)]
    nats_tls: bool,
    /// PEM file of the certificate authority that signed the NATS server's certificate, when
    /// it is not among the system's (implies --nats-tls).
    #[arg(long, value_name = "FILE")]
    nats_ca: Option<PathBuf>,
    /// Seconds a worker's lease on a session lasts unless renewed: how long a dead worker's
    /// sessions wait before another takes them over. The first process to reach a new NATS
    /// server sets it for all.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    lease_ttl: f64,
    /// GiB of frames the broker keeps for all sessions; past it uploads are refused (503,
    /// retry). Set by the first process to reach a new NATS server.
    #[arg(long, value_name = "GIB", default_value_t = 4.0)]
    frames_max_gib: f64,
    /// Copies a JetStream cluster keeps of the streams, buckets and object stores (3 in a
    /// cluster of three survives losing a server). Set by the first process to reach a new
    /// NATS server.
    #[arg(long, value_name = "N", default_value_t = 1)]
    nats_replicas: usize,
}

impl NatsArgs {
    fn config(&self, url: &str) -> Result<streamrecon::serve::NatsConfig> {
        let secret = |f: &Option<PathBuf>| -> Result<Option<String>> {
            f.as_ref()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .map(|t| t.trim().to_string())
                        .with_context(|| format!("cannot read {}", f.display()))
                })
                .transpose()
        };
        if !(self.lease_ttl.is_finite() && (0.5..=3600.0).contains(&self.lease_ttl)) {
            bail!("--lease-ttl must be 0.5 to 3600 seconds");
        }
        if !(self.frames_max_gib.is_finite() && (0.01..=1024.0).contains(&self.frames_max_gib)) {
            bail!("--frames-max-gib must be 0.01 to 1024");
        }
        if !(1..=5).contains(&self.nats_replicas) {
            bail!("--nats-replicas must be 1 to 5 (JetStream's range)");
        }
        Ok(streamrecon::serve::NatsConfig {
            url: url.to_string(),
            token: secret(&self.nats_token_file)?,
            nkey_seed: secret(&self.nats_nkey_file)?,
            tls: self.nats_tls || self.nats_ca.is_some(),
            ca: self.nats_ca.clone(),
            lease_ttl: std::time::Duration::from_secs_f64(self.lease_ttl),
            frames_max_bytes: (self.frames_max_gib * f64::from(1u32 << 30)) as i64,
            replicas: self.nats_replicas,
        })
    }
}

/// `streamrecon worker`: runs sessions that front doors (`serve --nats`) take in.
#[derive(Args)]
pub(super) struct WorkerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Most sessions this worker holds at once.
    #[arg(long, default_value_t = 4)]
    max_sessions: usize,
    /// Where the held sessions' working files go (the outputs themselves go to the broker).
    #[arg(long, default_value = "streamrecon-worker")]
    data_dir: PathBuf,
    /// Snapshot each session's engine and trajectory every N frames into the broker, so a
    /// session taken over after this worker dies replays at most N frames.
    #[arg(long, value_name = "N", default_value_t = streamrecon::serve::SNAPSHOT_EVERY)]
    snapshot_every: u64,
    /// This worker's name in leases [default: host name and process id].
    #[arg(long)]
    name: Option<String>,
    /// Serve the held sessions' live recordings (front doors pass `/sessions/{id}/live.rrd`
    /// on to the session's worker) and this worker's `/metrics` on this address. Needs
    /// --token-file.
    #[arg(long, requires = "token_file")]
    bind: Option<std::net::SocketAddr>,
    /// The URL front doors reach --bind by [default: http:// and the bound address].
    #[arg(long, requires = "bind")]
    advertise: Option<String>,
    /// File holding the bearer token of the front doors (their --token-file), asked of every
    /// request to --bind but /health.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    models: ModelFileArgs,
}

pub(super) fn cmd_worker(a: &WorkerArgs) -> Result<()> {
    let Some(url) = &a.nats.nats else {
        bail!("a worker needs --nats URL");
    };
    let name = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "worker".into(), |h| h.trim().to_string());
        format!("{host}-{}", std::process::id())
    });
    let config = streamrecon::serve::WorkerConfig {
        nats: a.nats.config(url)?,
        serve: streamrecon::serve::ServeConfig {
            options: a.models.options(),
            bind: ([127, 0, 0, 1], 0).into(),
            token: a
                .token_file
                .as_deref()
                .map(read_token)
                .transpose()?
                .unwrap_or_default(),
            max_sessions: a.max_sessions.max(1),
            data_dir: a.data_dir.clone(),
            allow_sources: Vec::new(),
            connect: None,
            snapshot_every: a.snapshot_every.max(1),
        },
        name,
        listen: a.bind,
        advertise: a.advertise.clone(),
    };
    let on_ready = |http: Option<&str>| {
        match http {
            Some(h) => println!("worker {} on {url}, serving {h}", config.name),
            None => println!("worker {} on {url}", config.name),
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
    };
    streamrecon::serve::run_worker(&config, on_ready, async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down: handing sessions back");
    })
    .with_context(|| format!("worker on {url}"))
}

/// A bearer token from a file: one word of 16 characters or more.
pub(super) fn read_token(f: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(f)
        .with_context(|| format!("cannot read the token file {}", f.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 || t.chars().any(char::is_whitespace) {
        bail!(
            "the token in {} must be one word of 16 characters or more",
            f.display()
        );
    }
    Ok(t)
}

pub(super) fn cmd_serve(a: &ServeArgs) -> Result<()> {
    use rand::Rng;
    streamrecon::io_util::create_dir(&a.data_dir)?;
    let token = if let Some(f) = &a.token_file {
        read_token(f)?
    } else if a.data_dir.join("token").exists() {
        // Made by an earlier start: clients keep working across restarts.
        read_token(&a.data_dir.join("token"))?
    } else {
        let mut rng = rand::rng();
        let t: String = (0..32)
            .map(|_| char::from_digit(u32::from(rng.random_range(0..16u8)), 16).unwrap_or('0'))
            .collect();
        let path = a.data_dir.join("token");
        streamrecon::io_util::write_secret(&path, t.as_bytes())?;
        eprintln!("bearer token written to {} (mode 0600)", path.display());
        t
    };
    if !a.bind.ip().is_loopback() {
        eprintln!(
            "listening beyond this machine ({}): every endpoint but /health needs the token",
            a.bind
        );
    }
    let config = streamrecon::serve::ServeConfig {
        options: a.models.options(),
        bind: a.bind,
        token,
        max_sessions: a.max_sessions.max(1),
        data_dir: a.data_dir.clone(),
        allow_sources: a.allow_source.clone(),
        connect: a.connect.clone(),
        snapshot_every: a.snapshot_every,
    };
    let on_bound = |addr| {
        println!("listening on http://{addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    };
    if let Some(url) = &a.nats.nats {
        let nats = a.nats.config(url)?;
        return streamrecon::serve::serve_door(&config, &nats, on_bound, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .with_context(|| format!("front door on {url}"));
    }
    streamrecon::serve::serve(&config, on_bound, async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down: closing sessions");
    })?;
    Ok(())
}

#[derive(Args)]
pub(super) struct ViewArgs {
    /// The recording (.rrd, as `run --save` or a service session writes it).
    recording: PathBuf,
    /// Address to listen on (port 0 picks a free one). No token guards it: keep it on loopback
    /// unless anyone reaching the address may see the recording.
    #[arg(long, default_value = "127.0.0.1:9090")]
    bind: std::net::SocketAddr,
}

pub(super) fn cmd_view(a: &ViewArgs) -> Result<()> {
    streamrecon::serve::view(
        &a.recording,
        a.bind,
        |addr| {
            println!("open http://{addr}/ in a browser (Ctrl-C stops)");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .with_context(|| format!("viewing {}", a.recording.display()))
}
