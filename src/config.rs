//! Command line and environment. Every server setting has an env fallback.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "modelpress",
    version,
    about = "Compress trained neural networks: a server and a CLI"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for `serve`, the default subcommand.
    #[command(flatten)]
    pub serve: ServeConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server and its workers (the default).
    Serve(ServeConfig),
    /// Run workers only, against a shared database (PostgreSQL): no API; `--addr` serves
    /// /healthz, /readyz and /metrics.
    Worker(ServeConfig),
    /// Compress a model file without a server, writing the same artifacts as a job.
    Compress(CompressArgs),
    /// Print the tensor inventory of a model file.
    Inspect(InspectArgs),
    /// Rebuild the dense model from a `model.mpz` archive, in its original format.
    Decompress(DecompressArgs),
    /// Score a compressed ONNX model against the original on a dataset (tract, in-process).
    Evaluate(EvaluateArgs),
    /// Create, list and revoke API keys (in the server's database).
    Keys(KeysArgs),
    /// Check a downloaded job: manifest.json's ed25519 signature and every artifact's sha256.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The directory holding manifest.json and the job's downloaded artifacts.
    pub dir: PathBuf,
    /// The server's public key (64 hex digits, from `GET /v1/signing-key`); the manifest
    /// must be signed by it.
    #[arg(long, conflicts_with = "server")]
    pub key: Option<String>,
    /// Fetch the trusted key from this server's `/v1/signing-key` (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    pub server: Option<String>,
    /// Pass although some artifacts the manifest lists were not downloaded (those present
    /// must still match).
    #[arg(long)]
    pub allow_missing: bool,
    /// Without --key or --server, check the manifest against the key it names itself. That
    /// proves nothing about who signed it (anyone can re-sign tampered artifacts with a key
    /// of their own), so it must be asked for.
    #[arg(long, conflicts_with_all = ["key", "server"])]
    pub trust_embedded_key: bool,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The server's data directory (its SQLite file lives there).
    #[arg(
        long,
        env = "MODELPRESS_DATA_DIR",
        default_value = "./modelpress-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Database URL; defaults to `sqlite://<data_dir>/modelpress.db`.
    #[arg(long, env = "MODELPRESS_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once (only its hash is stored).
    Create {
        /// The tenant the key belongs to (created if new): 1-64 of A-Z a-z 0-9 _ . -
        #[arg(long)]
        tenant: String,
        /// read (GET only), write (also submit, upload, cancel, delete) or admin (also
        /// /metrics off loopback).
        #[arg(long, default_value = "write")]
        scope: String,
    },
    /// List every key: id, tenant, scope, first characters, created, revoked, last used.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (from `keys list`); requests with it get 401 from then on.
    Revoke { id: String },
}

impl KeysArgs {
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!("sqlite://{}", self.data_dir.join("modelpress.db").display())
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "MODELPRESS_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Directory for the SQLite file and the blobs.
    #[arg(long, env = "MODELPRESS_DATA_DIR", default_value = "./modelpress-data")]
    pub data_dir: PathBuf,
    /// Database URL; defaults to `sqlite://<data_dir>/modelpress.db`.
    #[arg(long, env = "MODELPRESS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where models and artifacts live: `s3://bucket/prefix` (S3-compatible object storage;
    /// endpoint, region and credentials from the AWS_* variables), or by default `blobs/`
    /// under the data directory.
    #[arg(long, env = "MODELPRESS_BLOB_URL")]
    pub blob_url: Option<String>,
    /// `KEY=VALUE` settings of the object store client, over the AWS_* variables (keys as
    /// `object_store` names them: aws_endpoint, aws_region, aws_allow_http, …). Repeat the
    /// flag, or separate with commas in the variable. Prefer the AWS_* variables for secrets.
    #[arg(
        long = "blob-option",
        env = "MODELPRESS_BLOB_OPTIONS",
        value_delimiter = ','
    )]
    pub blob_options: Vec<String>,
    /// The ed25519 key that signs every job's manifest.json (made on first start); defaults
    /// to `<data-dir>/signing-key.ed25519`. A fleet's processes must all name the same file.
    #[arg(long, env = "MODELPRESS_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// Concurrent compression jobs; defaults to the number of available cores. 0 runs the
    /// API alone (jobs wait for a process with workers).
    #[arg(long, env = "MODELPRESS_WORKERS")]
    pub workers: Option<usize>,
    /// Largest accepted upload, in bytes (4 GiB by default).
    #[arg(long, env = "MODELPRESS_MAX_UPLOAD_BYTES", default_value_t = 4 << 30)]
    pub max_upload_bytes: u64,
    /// How long a worker's claim on a job lasts without a heartbeat, in milliseconds.
    #[arg(long, env = "MODELPRESS_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Attempts before a job whose worker keeps dying fails with `attempts_exhausted`.
    #[arg(long, env = "MODELPRESS_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// The first backoff after an attempt that failed for a reason that may pass (a full
    /// disk); it doubles with each attempt, up to five minutes.
    #[arg(long, env = "MODELPRESS_RETRY_BACKOFF_MS", default_value_t = 2_000)]
    pub retry_backoff_ms: u64,
    /// On SIGINT/SIGTERM, how long running jobs may take to finish before being requeued.
    #[arg(long, env = "MODELPRESS_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// An upload (or a JSON spec) that sends nothing for this long is refused with 408 and its
    /// partial file removed.
    #[arg(long, env = "MODELPRESS_BODY_IDLE_SECS", default_value_t = 30)]
    pub body_idle_secs: u64,
    /// A request's headers must arrive within this long, or the connection is closed (a
    /// keep-alive connection idle this long is closed too).
    #[arg(
        long,
        env = "MODELPRESS_HEADER_READ_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub header_read_timeout_secs: u64,
    /// Most HTTP connections at once (0: from the open-files limit, which is raised to its
    /// hard limit at start-up, less what the database, blobs and jobs need). Past it, a
    /// reserve of 64 more gets a one-second header deadline, so health probes are still
    /// answered; beyond that a connection is closed at once.
    #[arg(long, env = "MODELPRESS_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// After the first `body_idle_secs`, an upload slower than this on average is refused
    /// with 408 (a trickle would otherwise hold a connection and a staging file for hours).
    #[arg(
        long,
        env = "MODELPRESS_MIN_UPLOAD_BYTES_PER_SEC",
        default_value_t = 1024
    )]
    pub min_upload_bytes_per_sec: u64,
    /// What an uploaded .npz (model or dataset) may inflate to, all members together.
    #[arg(long, env = "MODELPRESS_MAX_INFLATED_BYTES", default_value_t = 8 << 30)]
    pub max_inflated_bytes: u64,
    /// How many times its own size an uploaded .npz may inflate to.
    #[arg(long, env = "MODELPRESS_MAX_INFLATION_RATIO", default_value_t = 200)]
    pub max_inflation_ratio: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "MODELPRESS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Uploads are refused (507 `insufficient_storage`) and `/readyz` answers 503 while less
    /// than this is free under the data directory, so the database always has room to write.
    #[arg(long, env = "MODELPRESS_MIN_FREE_BYTES", default_value_t = 64 << 20)]
    pub min_free_bytes: u64,
    /// Most bytes of files a worker keeps in its scratch directory (its jobs' copies of their
    /// inputs, and their outputs; 0: no cap but MODELPRESS_MIN_FREE_BYTES). A worker at its
    /// cap claims nothing and `/readyz` answers 503; an input that would pass it sends the
    /// job back to the queue for a worker with room.
    #[arg(long, env = "MODELPRESS_SCRATCH_MAX_BYTES", default_value_t = 0)]
    pub scratch_max_bytes: u64,
    /// Per tenant: most bytes of models, datasets and artifacts stored (0: no limit). An
    /// upload past it gets 507 `quota_exceeded`.
    #[arg(long, env = "MODELPRESS_QUOTA_STORED_BYTES", default_value_t = 0)]
    pub quota_stored_bytes: u64,
    /// Per tenant: most jobs queued or running at once (0: no limit); more get 429.
    #[arg(long, env = "MODELPRESS_QUOTA_CONCURRENT_JOBS", default_value_t = 0)]
    pub quota_concurrent_jobs: u64,
    /// Per tenant: most jobs submitted in any hour (0: no limit); more get 429 with
    /// Retry-After.
    #[arg(long, env = "MODELPRESS_QUOTA_JOBS_PER_HOUR", default_value_t = 0)]
    pub quota_jobs_per_hour: u64,
    /// Serve requests without an API key on a non-loopback address (as the default tenant).
    /// Without it, such a server refuses to start until a key exists.
    #[arg(long, env = "MODELPRESS_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// Networks webhooks may reach although they are not public: comma-separated CIDRs
    /// (`10.0.0.0/8,127.0.0.1/32`). Empty: public addresses only.
    #[arg(long, env = "MODELPRESS_WEBHOOK_ALLOW", default_value = "")]
    pub webhook_allow: String,
    /// How long a webhook delivery is retried (with exponential backoff) before it is
    /// recorded as `gave_up`.
    #[arg(
        long,
        env = "MODELPRESS_WEBHOOK_GIVE_UP_SECS",
        default_value_t = 86_400
    )]
    pub webhook_give_up_secs: u64,
    /// The first retry delay of a failed webhook delivery; it doubles each time, up to an hour.
    #[arg(
        long,
        env = "MODELPRESS_WEBHOOK_RETRY_BASE_MS",
        default_value_t = 10_000
    )]
    pub webhook_retry_base_ms: u64,
    /// How often the outbox is read for due deliveries.
    #[arg(long, env = "MODELPRESS_WEBHOOK_POLL_MS", default_value_t = 1_000)]
    pub webhook_poll_ms: u64,
    /// Crash points for tests (`tensor-delay-ms=N`, `panic`); needs the `failpoints` feature.
    #[arg(long, env = "MODELPRESS_FAILPOINT", hide = true)]
    pub failpoint: Option<String>,
}

impl ServeConfig {
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!("sqlite://{}", self.data_dir.join("modelpress.db").display())
        })
    }
    /// The inflation caps for uploads.
    pub fn inflation(&self) -> crate::formats::limits::Inflation {
        crate::formats::limits::Inflation {
            max_bytes: self.max_inflated_bytes,
            max_ratio: self.max_inflation_ratio.max(1),
        }
    }
    /// The webhook allow-list (checked at start-up, so a bad one never gets this far).
    pub fn webhook_allow_list(&self) -> crate::webhook::AllowList {
        self.webhook_allow.parse().unwrap_or_default()
    }
    /// Files in flight: uploads being received, each job's copies of its inputs and its
    /// outputs. Emptied when the process starts.
    pub fn scratch_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }

    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
    /// A configuration for tests and embedding: loopback, port 0, everything else default.
    pub fn for_data_dir(dir: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            addr: "127.0.0.1:0".into(),
            data_dir: dir.into(),
            database_url: None,
            blob_url: None,
            blob_options: Vec::new(),
            signing_key_file: None,
            workers: Some(2),
            max_upload_bytes: 4 << 30,
            lease_ms: 30_000,
            max_attempts: 3,
            retry_backoff_ms: 2_000,
            shutdown_grace_secs: 30,
            body_idle_secs: 30,
            header_read_timeout_secs: 30,
            max_connections: 0,
            min_upload_bytes_per_sec: 1024,
            max_inflated_bytes: 8 << 30,
            max_inflation_ratio: 200,
            log_format: "text".into(),
            allow_anonymous: false,
            min_free_bytes: 64 << 20,
            scratch_max_bytes: 0,
            quota_stored_bytes: 0,
            quota_concurrent_jobs: 0,
            quota_jobs_per_hour: 0,
            webhook_allow: String::new(),
            webhook_give_up_secs: 86_400,
            webhook_retry_base_ms: 10_000,
            webhook_poll_ms: 1_000,
            failpoint: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Model file (ONNX, safetensors, .npy, .npz; detected from content).
    pub input: PathBuf,
    /// A built-in preset: int8, int8-tensor, int4, int4-g32, int4-g128, int4-g32-gptq,
    /// int4-g128-gptq, int8-static, kmeans4, ternary, binary, prune50, prune50-int8, fp16,
    /// bf16, lowrank-90, separable, deep-compression.
    #[arg(long, conflicts_with = "spec", required_unless_present = "spec")]
    pub preset: Option<String>,
    /// A JSON spec file: {"pipeline": [...], "outputs": [...]} or {"preset": "..."}.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Output directory for the artifacts.
    #[arg(short, long, required_unless_present = "dry_run")]
    pub output: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print what would be done to each tensor and the estimated sizes; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// An .npz to calibrate on (graph inputs, samples on axis 0) for calibrated or static
    /// quantize steps (presets int4-g32-gptq, int4-g128-gptq, int8-static); it stands for
    /// the spec's `calibration` block.
    #[arg(long)]
    pub calibration_data: Option<PathBuf>,
    /// An .npz to fine-tune on (graph inputs, samples on axis 0); it stands for the spec's
    /// `finetune` block's dataset (the block's other settings, if the spec has one, apply).
    #[arg(long)]
    pub finetune_data: Option<PathBuf>,
    /// An .npz to distill on: it stands for the spec's `distill` block's dataset (the spec
    /// gives the block, with its `student`).
    #[arg(long)]
    pub distill_data: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model file.
    pub input: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The original ONNX model.
    pub original: PathBuf,
    /// The candidate ONNX model (e.g. a job's model.onnx).
    pub candidate: PathBuf,
    /// An .npz with one array per graph input (samples on axis 0) and optional int64 `labels`.
    #[arg(long)]
    pub data: PathBuf,
    /// top1, agreement, relative_error, decision_agreement or cosine.
    #[arg(long, default_value = "agreement")]
    pub metric: String,
    /// batched (64 rows a run), per_sample (models with batch 1) or whole (one run).
    #[arg(long, default_value = "batched")]
    pub feed: String,
    /// The output to score (default: the first float output).
    #[arg(long)]
    pub output: Option<String>,
    /// decision_agreement: a score above this is a positive.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f64,
}

#[derive(Debug, Args)]
pub struct DecompressArgs {
    /// A `model.mpz` archive written by a job or by `modelpress compress`.
    pub input: PathBuf,
    /// Output file; the model is written in the format it was uploaded in.
    #[arg(short, long)]
    pub output: PathBuf,
}
