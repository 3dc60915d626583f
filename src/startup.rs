//! Builds the application: database, blob store, router, workers. The listener is bound here
//! so tests can ask for port 0 (convention 3).

use crate::api;
use crate::config::ServeConfig;
use crate::queue::{Database, Notice};
use crate::state::{AppState, Inner};
use crate::worker;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// New files 0600 and directories 0700 in this process (`modelpress serve` and `worker`).
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Sets `path`'s mode; a failure (a directory the user owns but this process may not chmod)
/// is a warning, not a refusal to start.
fn make_private(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        tracing::warn!(path = %path.display(), error = %e, "could not make private");
    }
}

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The API, with `--workers` workers in the same process (0: the API alone).
    Serve,
    /// Workers only (`modelpress worker`): the listener serves `/healthz`, `/readyz` and
    /// `/metrics`, nothing else.
    Worker,
}

pub struct Application {
    pub state: AppState,
    listener: tokio::net::TcpListener,
    db: Arc<dyn Database>,
    role: Role,
}

impl Application {
    /// Opens storage, runs migrations and binds the listener; nothing runs until [`Application::run`].
    pub async fn build(config: ServeConfig) -> anyhow::Result<Application> {
        Application::build_as(config, Role::Serve).await
    }

    /// As [`Application::build`], for a process that runs `role`.
    pub async fn build_as(config: ServeConfig, role: Role) -> anyhow::Result<Application> {
        if role == Role::Worker && config.worker_count() == 0 {
            anyhow::bail!("`modelpress worker` needs at least one worker (--workers)");
        }
        std::fs::create_dir_all(&config.data_dir)?;
        make_private(&config.data_dir, 0o700);
        config
            .webhook_allow
            .parse::<crate::webhook::AllowList>()
            .map_err(|e| anyhow::anyhow!("MODELPRESS_WEBHOOK_ALLOW: {e}"))?;
        let db =
            crate::queue::open(&config.database_url(), Arc::new(crate::queue::SystemClock)).await?;
        // Files a release before 0700/0600 left readable by everyone.
        for name in ["modelpress.db", "modelpress.db-wal", "modelpress.db-shm"] {
            let path = config.data_dir.join(name);
            if path.exists() {
                make_private(&path, 0o600);
            }
        }
        let blobs = crate::store::open(
            config.blob_url.as_deref(),
            &config.blob_options,
            &config.data_dir,
        )?;
        // What a crashed process left in flight.
        let scratch = config.scratch_dir();
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)?;
        }
        std::fs::create_dir_all(&scratch)?;
        let listener = tokio::net::TcpListener::bind(&config.addr).await?;
        let loopback = listener.local_addr()?.ip().is_loopback();
        // Secure by default: off loopback, a server with no key would serve anyone. (A
        // worker's listener serves health and metrics only; `/metrics` needs an admin key
        // off loopback whenever keys exist.)
        let keyed = db.any_active_key().await?;
        if role == Role::Serve && !keyed && !loopback && !config.allow_anonymous {
            anyhow::bail!(
                "refusing to serve {} without API keys: create one with `modelpress keys create --tenant NAME` \
                 (same --data-dir or --database-url), or pass --allow-anonymous",
                config.addr
            );
        }
        if role == Role::Serve && !keyed {
            tracing::warn!(
                addr = %listener.local_addr()?,
                "no API key exists: every request runs as the default tenant without authentication"
            );
        }
        let state = AppState(Arc::new(Inner {
            models: db.clone(),
            queue: db.clone(),
            keys: db.clone(),
            webhooks: db.clone(),
            loopback,
            blobs,
            metrics: crate::telemetry::metrics_handle(),
            job_queued: Notify::new(),
            wakeups: db.shared(),
            running: Mutex::new(HashMap::new()),
            stop_claiming: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            events: crate::events::Hub::new(),
            signer: Arc::new(match &config.signing_key_file {
                Some(path) => crate::manifest::Signer::load_or_create_at(path)?,
                None => crate::manifest::Signer::load_or_create(&config.data_dir)?,
            }),
            instance_id: format!("{}-{}", std::process::id(), Uuid::new_v4().simple()),
            disk_full_at: std::sync::atomic::AtomicI64::new(0),
            config,
        }));
        // Secrets an earlier version stored in plain text are sealed before anything reads them.
        let seal = crate::webhook::SecretSeal::of(&state.signer);
        let sealed = crate::webhook::seal_plain_secrets(state.webhooks.as_ref(), &seal).await?;
        if sealed > 0 {
            tracing::info!(
                tenants = sealed,
                "sealed webhook secrets stored in plain text"
            );
        }
        if db.shared() {
            connect_processes(&state, &db).await?;
        }
        Ok(Application {
            state,
            listener,
            db,
            role,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves HTTP and runs the workers until `shutdown` resolves, then drains: stop
    /// claiming, give running jobs the grace period, requeue what is left.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let workers = worker::spawn_pool(state.clone(), state.config.worker_count());
        let sweeper = worker::spawn_sweeper(state.clone());
        // Webhooks keep going out until the last running job has ended.
        let deliveries_stop = CancellationToken::new();
        let deliverer = crate::webhook::spawn_deliverer(
            crate::webhook::Deliverer {
                outbox: state.webhooks.clone(),
                jobs: state.queue.clone(),
                allow: state.config.webhook_allow_list(),
                poll_ms: state.config.webhook_poll_ms,
                retry_base_ms: state.config.webhook_retry_base_ms,
                give_up_secs: state.config.webhook_give_up_secs,
                seal: crate::webhook::SecretSeal::of(&state.signer),
            },
            deliveries_stop.clone(),
        );
        let app = match self.role {
            Role::Serve => api::router(state.clone()),
            Role::Worker => api::health_router(state.clone()),
        };
        let stop = state.stop_claiming.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: no new jobs will be claimed");
            stop.cancel();
        });
        let limits = api::serve::Limits::new(
            state.config.max_connections,
            state.config.header_read_timeout_secs,
        );
        let server = tokio::spawn(api::serve::serve(
            self.listener,
            app,
            limits,
            state.stop_claiming.clone(),
        ));
        state.stop_claiming.cancelled().await;
        let grace = std::time::Duration::from_secs(state.config.shutdown_grace_secs);
        let hard = state.hard_stop.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::warn!("grace period over: stopping running jobs and requeueing them");
            hard.cancel();
        });
        for w in workers {
            let _ = w.await;
        }
        timer.abort();
        sweeper.abort();
        deliveries_stop.cancel();
        let _ = deliverer.await;
        let _ = server.await;
        self.db.close().await;
        Ok(())
    }
}

/// Joins the processes sharing the database: job events leave through it and come back from
/// every process (the event streams), and a job queued anywhere wakes this process's idle
/// workers.
async fn connect_processes(state: &AppState, db: &Arc<dyn Database>) -> anyhow::Result<()> {
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<String>(4096);
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Notice>(4096);
    db.listen(in_tx).await?;
    state.events.relay_through(out_tx);
    let relay_db = db.clone();
    tokio::spawn(async move {
        while let Some(text) = out_rx.recv().await {
            if let Err(e) = relay_db.announce(&text).await {
                tracing::warn!(error = %e, "could not relay a job event");
            }
        }
    });
    let hub_state = state.clone();
    tokio::spawn(async move {
        while let Some(notice) = in_rx.recv().await {
            match notice {
                Notice::JobQueued => hub_state.job_queued.notify_waiters(),
                Notice::Event(text) => hub_state.events.deliver_remote(&text),
                Notice::Gap => {
                    hub_state.job_queued.notify_waiters();
                    hub_state.events.gap();
                }
            }
        }
    });
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
