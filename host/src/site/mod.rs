//! The site service: a computing centre's one endpoint for grid users. It owns
//! identity (users, bearer tokens, roles), quotas, leases, asynchronous jobs and
//! placement, and drives its agents over HTTP with each agent's own secret.
//!
//! The path of a request: `POST /v1/vms` → [`vms_api`] (identify, check) →
//! [`jobs::Submitter`] (quota checked and job recorded in one group-committed
//! transaction, `202`) → [`jobs`] runner → [`SiteCore::run_request`] (claim a free VM
//! or place and create one; start; provision) → [`agents::Agents::run_op`] (agent
//! HTTP API with an idempotency key, long-polled) → the agent's operation.

pub mod admin_api;
pub mod agent_twin;
pub mod agents;
pub mod auth;
pub mod bodies;
pub mod config;
pub mod copy;
pub mod glue2;
pub mod jobs;
pub mod leases;
pub mod model;
pub mod placement;
pub mod portal;
pub mod ready;
pub mod request;
pub mod retention;
pub mod scheduler;
pub mod staging;
pub mod store;
pub mod vm_sync;
pub mod vms;
pub mod vms_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use tokio::sync::oneshot;

use crate::api::{self, server::Handler, ApiError, Response};
pub use config::SiteConfig;
use model::{now_ms, Quota, Role, User};
use store::{Store, StoreError};

/// The OpenAPI 3 document of the site's HTTP API (also `docs/openapi.yaml`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// Everything a site's handlers and jobs share.
pub struct SiteCore {
    /// The site database.
    pub store: Store,
    /// Its agents.
    pub agents: Arc<agents::Agents>,
    /// Its configuration.
    pub config: SiteConfig,
    /// Records new jobs.
    pub submitter: jobs::Submitter,
    /// Decides which queued job runs next.
    pub scheduler: Arc<scheduler::Scheduler>,
    /// Refuses new work while the disk is nearly full.
    pub disk: Arc<retention::DiskGuard>,
    /// Bytes each user's copies hold in staging, against their quota and the cap.
    pub staging: staging::Staging,
    /// Requests placed on an agent but not created yet: job → (agent, MiB). Kept in
    /// memory (placement reads it for every request; scanning the jobs would not scale).
    pub placing: std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::SiteMetrics,
}

/// Why a site could not start.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The configuration is not usable.
    #[error("site config: {0}")]
    Config(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

struct SiteApi {
    core: Arc<SiteCore>,
}

impl SiteApi {
    async fn route(&self, req: Request<Incoming>) -> Result<Response, ApiError> {
        let path = req.uri().path().to_string();
        let segs = api::segments(&path);
        // The portal's static page and assets: anonymous, they hold no data.
        if req.method() == hyper::Method::GET {
            if let Some(r) = portal::serve(&path) {
                return Ok(r);
            }
        }
        match segs.as_slice() {
            ["v1", "health"] => return api::ok(&serde_json::json!({ "status": "ok" })),
            ["v1", "openapi.yaml"] => return api::yaml(OPENAPI),
            _ => {}
        }
        // Every other call is identified before anything else happens.
        let caller = auth::identify(&self.core.store, &req)?;
        caller.require_route(req.method(), &segs)?;
        let core = &self.core;
        match segs.as_slice() {
            ["v1", "me"] | ["v1", "users", ..] => core.handle_users(&caller, req, &segs).await,
            ["v1", "agents", ..] => core.handle_agents(&caller, req, &segs).await,
            ["v1", "vms", ..] | ["v1", "templates"] => core.handle_vms(&caller, req, &segs).await,
            ["v1", "jobs", ..] => core.handle_jobs(&caller, req, &segs).await,
            ["v1", "audit"] if req.method() == hyper::Method::GET => {
                core.handle_audit(&caller, &req)
            }
            ["metrics"] if req.method() == hyper::Method::GET => {
                if caller.role != Role::Monitor {
                    caller.require_admin()?;
                }
                core.metrics_text().map_err(agents::db)
            }
            ["v1", "glue2"] if req.method() == hyper::Method::GET => {
                api::ok(&core.glue2().map_err(agents::db)?)
            }
            _ => Err(ApiError::no_route(req.method(), &path)),
        }
    }
}

impl Handler for SiteApi {
    async fn handle(&self, req: Request<Incoming>) -> Response {
        self.route(req)
            .await
            .unwrap_or_else(ApiError::into_response)
    }
}

impl SiteCore {
    /// The Prometheus exposition, its gauges read now.
    pub fn metrics_text(&self) -> Result<Response, StoreError> {
        use crate::metrics::{count, name_of};
        // From the tally kept with every job write: no job is read.
        let active = self
            .store
            .active_tally()?
            .into_iter()
            .map(|(k, n)| (k, i64::try_from(n).unwrap_or(i64::MAX)));
        let tallies = self.store.vm_tallies()?;
        let agents = self.store.agents()?;
        let kept = self.store.finished_job_count()?;
        let mut vms_by_state: std::collections::BTreeMap<String, i64> = Default::default();
        for t in &tallies {
            let n = vms_by_state.entry(t.state.clone()).or_default();
            *n = n.saturating_add(i64::try_from(t.n).unwrap_or(i64::MAX));
        }
        let _one = self
            .metrics
            .scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.metrics.work.set_now(active, vms_by_state);
        self.metrics
            .jobs_kept
            .set(i64::try_from(kept).unwrap_or(i64::MAX));
        self.metrics.agents.clear();
        for (status, n) in count(&agents, |a| name_of(&a.status)) {
            self.metrics
                .agents
                .get_or_create(&crate::metrics::StateLabel { state: status })
                .set(n);
        }
        Ok(api::text(
            crate::metrics::CONTENT_TYPE,
            self.metrics.render(),
        ))
    }

    /// The site's GLUE 2 document ([`glue2`]), read now.
    pub fn glue2(&self) -> Result<serde_json::Value, StoreError> {
        let agents = self.store.agents()?;
        let tallies = self.store.vm_tallies()?;
        let held_mib = self.store.memory_by_agent()?;
        let pending: Vec<(String, u64)> = self
            .placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let (mut active, mut running) = (0u64, 0u64);
        for ((_, state), n) in self.store.active_tally()? {
            active = active.saturating_add(n);
            if state == model::JobState::Running.as_str() {
                running = running.saturating_add(n);
            }
        }
        let url = self.config.url();
        Ok(glue2::document(&glue2::Inputs {
            site_id: &self.config.site_id,
            url: &url,
            quality_level: &self.config.quality_level,
            agents: &agents,
            tallies: &tallies,
            held_mib: &held_mib,
            pending: &pending,
            waiting_jobs: active - running,
            running_jobs: running,
            draining: self.disk.check().is_err(),
            lease_max_seconds: self.config.lease_max_seconds,
            lease_default_seconds: self.config.lease_default_seconds,
            now_ms: now_ms(),
        }))
    }
}

/// A running site.
pub struct Site {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its shared state.
    pub core: Arc<SiteCore>,
    /// Its open HTTP connections.
    pub connections: Arc<api::server::Connections>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Site {
    /// Opens the database, makes sure the admin user exists, resumes unfinished jobs
    /// and serves the API.
    pub async fn start(config: SiteConfig) -> Result<Site, SiteError> {
        config.validate().map_err(SiteError::Config)?;
        let store = Store::open_with_cache(
            &config.data_dir.join("site.redb"),
            config.database_cache_mib,
        )?
        .with_max_events(config.max_job_events);
        let admin_hash = auth::hash(&config.admin_token);
        // The site's instance id (see `agent::site_claim`): made at its first
        // start, kept in its database.
        let instance = store.write(|t| {
            let admin = match t.user("admin")? {
                Some(mut u) => {
                    u.token_sha256 = admin_hash.clone();
                    u.role = Role::Admin;
                    u
                }
                None => User {
                    name: "admin".into(),
                    role: Role::Admin,
                    token_sha256: admin_hash.clone(),
                    quota: Quota::default(),
                    created_ms: now_ms(),
                },
            };
            t.put_user(&admin)?;
            t.set_meta("site-id", &config.site_id)?;
            match t.meta("instance")? {
                Some(i) => Ok(i),
                None => {
                    let i = uuid::Uuid::new_v4().to_string();
                    t.set_meta("instance", &i)?;
                    Ok(i)
                }
            }
        })?;
        let sealer = crate::sealing::Sealer::open_or_create(&config.data_dir.join("site.key"))
            .map_err(|e| SiteError::Config(e.to_string()))?;
        let metrics = crate::metrics::SiteMetrics::default();
        let agents = Arc::new(agents::Agents::new(
            store.clone(),
            config.site_id.clone(),
            instance,
            sealer,
            config.agent_tls.clone(),
            metrics.agent_listings.clone(),
        )?);
        let scheduler = scheduler::Scheduler::new(scheduler::Limits {
            parallel: config.parallel_jobs,
            running_per_user: config.max_running_jobs_per_user,
            queued_per_user: config.max_queued_jobs_per_user,
            system: config.system_jobs,
        });
        let disk = Arc::new(retention::DiskGuard::new(
            &config.data_dir,
            config.min_free_disk_mib,
        ));
        let submitter = jobs::Submitter::start(store.clone(), scheduler.clone(), disk.clone());
        let staging =
            staging::Staging::new(config.max_staging_mib_per_user, config.max_staging_mib);
        staging.recount(&config.data_dir.join("staging"), |job| {
            store.job(job).ok().flatten().map(|j| j.owner)
        });
        let core = Arc::new(SiteCore {
            store,
            agents: agents.clone(),
            config: config.clone(),
            submitter,
            scheduler,
            disk,
            staging,
            placing: Default::default(),
            metrics,
        });
        let resumed = core.resume_all()?;
        if resumed > 0 {
            tracing::warn!(resumed, "resuming jobs a previous run left unfinished");
        }
        let background = vec![
            jobs::spawn_runner(core.clone()),
            agents.spawn_health(Duration::from_millis(config.health_period_ms)),
            core.spawn_leases(),
        ];
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| SiteError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SiteError::Listen {
            addr: config.listen,
            source,
        })?;
        let handler = Arc::new(SiteApi { core: core.clone() });
        let running = api::server::spawn(listener, handler, config.http, config.tls.as_ref())
            .map_err(|e| SiteError::Config(e.to_string()))?;
        tracing::info!(%addr, "site listening");
        Ok(Site {
            addr,
            core,
            connections: running.connections,
            stop: Some(running.stop),
            task: running.task,
            background,
        })
    }

    /// Stops serving and the background tasks.
    pub async fn stop(mut self) {
        // Retention runs on a blocking thread of its own: told, it ends after its batch.
        self.core.store.stop_background();
        for b in &self.background {
            b.abort();
        }
        // Awaited so that what they hold (the store) is released when this returns.
        for b in self.background.drain(..) {
            let _ = b.await;
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        // Returns once the database is closed: the job writer's thread, the
        // health checks and the running jobs (cancelled with the runner; a
        // restarted site resumes them) being dropped hold it a moment; past
        // CLOSE_WAIT this returns with a warning.
        let watch = self.core.store.close_watch();
        drop(self);
        if !watch.closed(crate::store_core::CLOSE_WAIT).await {
            tracing::warn!("the site database is still open after stop");
        }
    }

    /// Serves until Ctrl-C or SIGTERM.
    pub async fn run_until_signal(self) {
        api::server::until_signal().await;
        tracing::info!("site stopping");
        self.stop().await;
    }
}
