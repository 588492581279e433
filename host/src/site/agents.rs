//! The site's agents: registered and unregistered at runtime by an admin, called with
//! each agent's own secret, checked every health period. A check records the host's
//! capacity and templates and brings the site's VM records in line with the agent's
//! registry; an agent that does not answer is marked down, and its VMs' state is
//! shown as `unknown` until it answers again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub use super::agent_twin::Release;
use super::model::{
    now_ms, AgentRec, AgentStatus, AgentView, OpError, SiteVm, TemplateOffer, Usage,
};
use super::store::{OwedRelease, Store, StoreError};
pub use super::vm_sync::MISSING;
use super::vm_sync::{Applied, Checked, Comparison, Forgetting, Listings};
use crate::agent::model::{OpState, Operation, Vm};
use crate::agent::site_claim;
use crate::api::client::{Client, Paged};
use crate::api::ApiError;

/// The site's view of its agents.
pub struct Agents {
    store: Store,
    site_id: String,
    /// This site's instance id, sent with its registrations (see
    /// [`crate::agent::site_claim`]).
    site_instance: String,
    sealer: crate::sealing::Sealer,
    tls: crate::api::tls::ClientTls,
    /// Per agent, its client and the registration (time) it was built for.
    clients: RwLock<HashMap<String, (Client, u64)>>,
    /// Moves (under `clients`' lock) whenever an agent is registered or
    /// unregistered: a client built from a record read before is not kept.
    registrations: std::sync::atomic::AtomicU64,
    /// The tags of the agents' last settled VM listings.
    listings: Listings,
    /// Checks' VM listings counted by outcome (the site's metrics).
    listing_counts: ListingCounts,
    /// The health checks' period, ms (set by [`Agents::spawn_health`]).
    health_period_ms: std::sync::atomic::AtomicU64,
    /// Checks that may read and apply an agent's whole VM listing at once.
    full_reads: tokio::sync::Semaphore,
    /// Per agent id, held while the agent is told it serves this site (a
    /// registration's PUT and record, a check's hold) or released from it: a
    /// check that read the agent before an unregistration does not hold it after
    /// the release, nor a late release undo a registration.
    claims: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// How many checks read and apply a whole VM listing at once: each holds what
/// it compares by for every VM of the agent, and the listed VMs that differ
/// (all of them at an agent's first check), and a restarted site reads every
/// agent's listing in full.
const FULL_READS: usize = 2;

/// What a check made of an agent's VM listing.
enum VmListing {
    /// The listing still has the tag of the last settled one (304).
    Unchanged,
    /// Read and compared with the site's records; applied next.
    Compared {
        /// The comparison, holding the VMs that differ.
        comparison: Comparison,
        /// The listing's entity tag.
        tag: Option<String>,
    },
    /// The agent is no longer the registration the check's client is for.
    Unregistered,
    /// The site could not read its own records to compare with.
    Failed(StoreError),
}

/// A listing this long is followed by giving freed heap back to the system.
const TRIM_AFTER_VMS: usize = 10_000;

/// Health checks' VM listings counted by outcome.
pub type ListingCounts = prometheus_client::metrics::family::Family<
    crate::metrics::StateLabel,
    prometheus_client::metrics::counter::Counter,
>;

/// How long a check may take before its agent counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Forgets the release owed under `key` (the agent took it, or it was given up).
fn settle(store: &Store, key: &str) {
    if let Err(e) = store.settle_release(key) {
        tracing::warn!(error = %e, "a release settled stays owed");
    }
}

/// Every how many health rounds the releases still owed are sent again (about a
/// minute at the default period).
const RELEASE_OWED_EVERY: u64 = 12;

/// How long a release is owed before it is given up.
const RELEASE_OWED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// The site-wide id of VM `vm` on agent `agent`: stable, and the same wherever it is
/// computed (a job that creates a VM and a check that discovers it agree).
pub fn site_vm_id(agent: &str, vm: &str) -> String {
    let h = Sha256::digest(format!("{agent}\0{vm}").as_bytes());
    format!("vm-{}", &hex::encode(h)[..12])
}

pub(crate) fn db(e: StoreError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}

/// An agent-side failure as a job error, naming the agent.
pub fn agent_error(agent: &str, e: ApiError) -> OpError {
    OpError {
        kind: e.kind,
        message: format!("agent {agent}: {}", e.message),
    }
}

impl Agents {
    /// The agents of `store`'s site (`site_id`, instance `site_instance`), their
    /// secrets sealed by `sealer`. Secrets an earlier version stored in the clear
    /// are sealed now.
    pub fn new(
        store: Store,
        site_id: String,
        site_instance: String,
        sealer: crate::sealing::Sealer,
        tls: crate::api::tls::ClientTls,
        listing_counts: ListingCounts,
    ) -> Result<Agents, StoreError> {
        store.write(|t| {
            for mut a in t.agents()? {
                if !crate::sealing::Sealer::is_sealed(&a.token) {
                    a.token = sealer.seal(&a.token);
                    t.put_agent(&a)?;
                }
            }
            Ok(())
        })?;
        Ok(Agents {
            store,
            site_id,
            site_instance,
            sealer,
            tls,
            clients: RwLock::new(HashMap::new()),
            registrations: Default::default(),
            listings: Listings::default(),
            listing_counts,
            health_period_ms: std::sync::atomic::AtomicU64::new(5_000),
            full_reads: tokio::sync::Semaphore::new(FULL_READS),
            claims: Default::default(),
        })
    }

    /// When a VM record `missing` from its agent is forgotten: once every
    /// other agent up has had a listing taken since and applied (and claimed
    /// it, if it moved there and is the same VM: see `vm_sync::sync_listed`),
    /// and not before two rounds of health checks and the longest a check's
    /// requests may take.
    fn forgetting(&self) -> Forgetting {
        let period = self
            .health_period_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        self.listings
            .forgetting(2 * period + CHECK_TIMEOUT.as_millis() as u64)
    }

    /// A client for agent `id`, authenticated with its secret.
    pub fn client(&self, id: &str) -> Result<Client, ApiError> {
        self.registered_client(id).map(|(c, _)| c)
    }

    /// [`Agents::client`], and the time of the registration it is for.
    fn registered_client(&self, id: &str) -> Result<(Client, u64), ApiError> {
        if let Some(c) = self
            .clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(c.clone());
        }
        let (generation, c) = self.build_client(id)?;
        self.keep_client(id, generation, &c);
        Ok(c)
    }

    /// A new client for agent `id`, from its record as it is now, with the
    /// time of that registration, and the registrations count it was read at.
    fn build_client(&self, id: &str) -> Result<(u64, (Client, u64)), ApiError> {
        let generation = self
            .registrations
            .load(std::sync::atomic::Ordering::Acquire);
        let rec = self.store.agent(id).map_err(db)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no agent '{id}'"),
            )
        })?;
        let c = self.client_of(&rec)?;
        Ok((generation, (c, rec.registered_ms)))
    }

    /// A client of the agent registration `rec` names (its URL, secret, pin).
    fn client_of(&self, rec: &AgentRec) -> Result<Client, ApiError> {
        let secret = self.sealer.unseal(&rec.token).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend",
                format!("agent '{}': {e}", rec.id),
            )
        })?;
        Client::with_tls(
            &rec.url,
            Some(secret),
            &self.tls_for(rec.fingerprint.as_deref()),
        )
    }

    /// Keeps agent `id`'s client `c`, built at `generation`, unless a
    /// registration or unregistration came since: a health check that read the
    /// record of an agent as it re-registered at a new URL would otherwise keep
    /// the old URL's client for good.
    fn keep_client(&self, id: &str, generation: u64, c: &(Client, u64)) {
        let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
        if self
            .registrations
            .load(std::sync::atomic::Ordering::Acquire)
            == generation
        {
            clients.insert(id.to_string(), c.clone());
        }
    }

    /// Forgets agent `id`'s client after its record changed (registered or
    /// unregistered); clients being built from the old record are not kept.
    fn forget_client(&self, id: &str) {
        let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
        self.registrations
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        clients.remove(id);
    }

    /// How to verify an agent with certificate fingerprint `pin` (else by the CA).
    fn tls_for(&self, pin: Option<&str>) -> crate::api::tls::ClientTls {
        let mut t = self.tls.clone();
        if let Some(p) = pin {
            t.fingerprint = Some(p.to_string());
        }
        t
    }

    /// Registers an agent: checks that it answers with this secret (over TLS, the
    /// certificate `fingerprint` pins, or the site's agent CA), tells it which site
    /// it serves, and records it.
    pub async fn register(
        &self,
        id: &str,
        url: &str,
        token: &str,
        fingerprint: Option<&str>,
    ) -> Result<AgentView, ApiError> {
        let fingerprint = fingerprint
            .map(crate::api::tls::normalize_fingerprint)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        super::auth::validate_id("agent id", id)?;
        let taken = || {
            ApiError::new(
                StatusCode::CONFLICT,
                "already-exists",
                format!("agent '{id}' is registered already"),
            )
        };
        if self.store.agent(id).map_err(db)?.is_some() {
            return Err(taken());
        }
        let c = Client::with_tls(
            url,
            Some(token.to_string()),
            &self.tls_for(fingerprint.as_deref()),
        )?;
        let unavailable = |e: ApiError| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "agent '{id}' at {url} did not accept this site: {}",
                    e.message
                ),
            )
        };
        // One agent, one registration (a second would offer its capacity twice
        // and have two agents claim its VMs): known by the instance id the agent
        // answers, not its URL (a host has many names).
        let serving: Value = c.get("/v1/site").await.map_err(unavailable)?;
        let mut rec = AgentRec::registered(id, url, self.sealer.seal(token), fingerprint);
        let site = self.claim(id, rec.registered_ms);
        let twin = super::agent_twin::Twin::of(&serving, &site);
        let instance = twin.instance.as_deref().unwrap_or("none");
        let refuse = |other: &str| {
            ApiError::new(
                StatusCode::CONFLICT,
                "already-exists",
                format!(
                    "the agent at {url} (instance {instance}) is registered already as \
                     '{other}': unregister '{other}' first to register it as '{id}'"
                ),
            )
        };
        if let Some(other) = twin.among(id, url, self.store.agents().map_err(db)?) {
            return Err(refuse(&other));
        }
        // One agent, one site: an agent another site registered is refused here
        // (for a clear answer) and by the agent itself (for two sites racing).
        let elsewhere = |message: String| {
            ApiError::new(
                StatusCode::CONFLICT,
                "already-exists",
                format!("agent '{id}' at {url}: {message}"),
            )
        };
        let theirs = &serving["site"];
        // A record from before site instance ids names a site by its id only
        // (`site` unless set): this site's only if it holds that registration.
        let old_and_ours = match (theirs["instance"].is_null(), &twin.serving_as()) {
            (true, Some(agent)) => self.store.holds_agent(agent).map_err(db)?,
            _ => true,
        };
        if theirs.is_object() && (!site_claim::same_site(theirs, &site) || !old_and_ours) {
            return Err(elsewhere(site_claim::serves_already("the agent", theirs)));
        }
        // A check or release of an earlier registration of this id is not sent
        // between this PUT and the record.
        let claims = self.claim_lock(id);
        let one = claims.lock().await;
        c.call::<_, Value>(Method::PUT, "/v1/site", Some(&site))
            .await
            .map_err(|e| match e.status {
                409 => elsewhere(e.message),
                _ => unavailable(e),
            })?;
        rec.instance = twin.instance.clone();
        // Checked again in the transaction: two registrations of one id (or of
        // one agent) race.
        let refused = self.store.write(|t| {
            if t.agent(id)?.is_some() {
                return Ok(Some(taken()));
            }
            if let Some(other) = twin.among(id, url, t.agents()?) {
                return Ok(Some(refuse(&other)));
            }
            t.put_agent(&rec)?;
            Ok(None)
        });
        drop(one);
        if let Some(e) = refused.map_err(db)? {
            return Err(e);
        }
        // Nothing an earlier registration under this id settled carries over.
        self.forget_client(id);
        self.listings.forget(id);
        self.check(id).await;
        let rec = self.store.agent(id).map_err(db)?.unwrap_or(rec);
        Ok(AgentView::from(&rec))
    }

    /// This site's record for the agent it registered as `id` at `registered_ms`,
    /// as the agent keeps it (see [`site_claim`]): the time tells a registration
    /// from a later one of the same id, which an earlier one's release must not
    /// release.
    fn claim(&self, id: &str, registered_ms: u64) -> Value {
        json!({
            "id": self.site_id,
            "instance": self.site_instance,
            "agent-id": id,
            "at-ms": registered_ms,
        })
    }

    /// The lock of agent id `id`'s claims (see `claims`).
    fn claim_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        lock_of(&mut locks, id)
    }

    /// Unregisters an agent. Refused while users hold VMs on it, unless `force`
    /// (their VMs are then forgotten and their quota given back). Then releases
    /// the agent from this registration, so that another site may register it:
    /// under way when this answers, carried to its end whatever the caller does,
    /// and owed (recorded with the unregistration) until the agent takes it.
    pub fn unregister(&self, id: &str, force: bool) -> Result<Release, ApiError> {
        let client = self.client(id).ok();
        let r = self.store.write(|t| {
            let Some(rec) = t.agent(id)? else {
                return Ok(Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no agent '{id}'"),
                )));
            };
            let vms: Vec<SiteVm> = t.vms_of_agent(id)?;
            let held = vms.iter().filter(|v| v.owner.is_some()).count();
            if held > 0 && !force {
                return Ok(Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid-state",
                    format!("agent '{id}' has {held} allocated VMs; release them or unregister with force"),
                )));
            }
            for v in vms {
                forget_vm(t, &v)?;
            }
            t.remove_agent(id)?;
            // Owed until the agent takes it: sent again if it does not now.
            let owed = OwedRelease {
                agent: rec,
                since_ms: now_ms(),
            };
            t.owe_release(&owed)?;
            Ok(Ok(owed))
        });
        self.forget_client(id);
        self.listings.forget(id);
        let owed = r.map_err(db)??;
        Ok(self.release(&owed, client))
    }

    /// Sends the release `owed` (through `client`), and forgets it once the agent
    /// took it. Only that registration: not another site's, nor one of this
    /// site's made since under another id, or under this id again (a release
    /// sent late must not release that).
    fn release(&self, owed: &OwedRelease, client: Option<Client>) -> Release {
        Release::spawn(client.map(|c| self.delivery(owed, c, true)))
    }

    /// The sending of release `owed` through `c` ([`deliver`](super::agent_twin::deliver),
    /// `loud` as there), which forgets it once the agent took it; answers whether it did.
    fn delivery(
        &self,
        owed: &OwedRelease,
        c: Client,
        loud: bool,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let id = owed.agent.id.clone();
        let claim = self.claim(&id, owed.agent.registered_ms);
        let lock = self.claim_lock(&id);
        let (store, key) = (self.store.clone(), owed.key());
        async move {
            let gone = || store.holds_agent(&id).is_ok_and(|held| !held);
            let told = super::agent_twin::deliver(&c, &claim, &lock, gone, loud).await;
            if told {
                settle(&store, &key);
            }
            told
        }
    }

    /// Sends every release still owed again (agents that were down, or whose
    /// release a crash cut off), all at once; answers when each ended. One owed
    /// for [`RELEASE_OWED_FOR`] is given up, with a warning: the agent's admin
    /// releases it by hand (`gve agent release`).
    pub async fn release_owed(&self) {
        let owed = match self.store.owed_releases() {
            Ok(owed) => owed,
            Err(e) => {
                tracing::warn!(error = %e, "releases owed not read");
                return;
            }
        };
        let mut sent = tokio::task::JoinSet::new();
        for o in owed {
            let id = o.agent.id.clone();
            if now_ms().saturating_sub(o.since_ms) >= RELEASE_OWED_FOR.as_millis() as u64 {
                tracing::warn!(
                    agent = id,
                    url = o.agent.url,
                    "an unregistered agent did not take its release for 7 days: given up \
                     (release it on the agent with `gve agent release`)"
                );
                settle(&self.store, &o.key());
                continue;
            }
            match self.client_of(&o.agent) {
                Ok(c) => {
                    sent.spawn(self.delivery(&o, c, false));
                }
                Err(e) => tracing::debug!(agent = id, error = %e, "owed release not sent"),
            }
        }
        while sent.join_next().await.is_some() {}
    }

    /// Checks one agent: capacity, templates, endpoint and VMs; marks it up or down.
    /// An agent that does not tell about itself within 15 s, or list its VMs
    /// within 15 s more (not counting the site's own wait and reads), is down.
    pub async fn check(&self, id: &str) {
        let Ok((c, registered_ms)) = self.registered_client(id) else {
            return;
        };
        let late = || {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("agent {id} did not answer its health check within 15 s"),
            )
        };
        let about = tokio::time::timeout(CHECK_TIMEOUT, async {
            // One agent, one site: the site it serves is this one (first: served
            // without a driver, so an agent whose driver fails is held too).
            let serving: Value = c.get("/v1/site").await?;
            let still = || {
                self.store
                    .agent(id)
                    .is_ok_and(|a| a.is_some_and(|a| a.registered_ms == registered_ms))
            };
            let instance = super::agent_twin::Twin::hold(
                &c,
                &self.claim(id, registered_ms),
                &serving,
                &self.claim_lock(id),
                still,
                |other| self.store.holds_agent(other).unwrap_or(false),
            )
            .await?;
            let host: crate::agent::model::Host = c.get("/v1/host").await?;
            let templates: Vec<Vm> = c.get("/v1/templates").await?;
            let driver: Value = c.get("/v1/driver").await?;
            Ok::<_, ApiError>((host, templates, driver, instance))
        })
        .await
        .unwrap_or_else(|_| Err(late()));
        // Every page (a VM left out would be taken for gone), unless the agent's
        // VMs are as the last settled listing saw them.
        let tag = self.listings.tag(id, self.store.vm_writes(id));
        let mut listed_at = now_ms();
        let mut turn = None;
        let got = match about {
            Err(e) => Err(e),
            Ok(about) => {
                let vms = self
                    .list_vms(
                        &c,
                        id,
                        registered_ms,
                        tag.as_deref(),
                        &mut turn,
                        &mut listed_at,
                    )
                    .await;
                vms.map(|vms| (about, vms))
            }
        };
        let read = match &got {
            Ok((_, VmListing::Compared { comparison, .. })) => comparison.listed(),
            _ => 0,
        };
        // What a check learns, the next check learns again: no need to wait for
        // the disk. The agent's record first; then its VMs, off the async
        // workers and in batches (a first check may adopt 100,000).
        let (about, vms) = match got {
            Ok((about, vms)) => (Ok(about), Some(vms)),
            Err(e) => (Err(e), None),
        };
        let r = self.store.write_lazy(|t| {
            // A check of an earlier registration tells nothing of this one.
            let Some(mut rec) = t
                .agent(id)?
                .filter(|r| r.url == c.base() && r.registered_ms == registered_ms)
            else {
                return Ok(None);
            };
            match about {
                Ok((host, templates, driver, instance)) => {
                    // The agent's instance as it says now: learnt by a registration
                    // from before instance ids, made anew with a database made anew.
                    if instance.is_some() {
                        rec.instance = instance;
                    }
                    rec.status = AgentStatus::Up;
                    rec.error = None;
                    rec.seen_ms = now_ms();
                    rec.host = Some(host);
                    rec.offers = templates.iter().map(TemplateOffer::from).collect();
                    rec.templates = templates.into_iter().map(|t| t.name).collect();
                    rec.endpoint = driver["migration-uri"]
                        .as_str()
                        .or(driver["endpoint"].as_str())
                        .map(str::to_string);
                }
                Err(e) => {
                    if rec.status == AgentStatus::Up {
                        tracing::warn!(agent = id, "agent down: {}", e.message);
                    }
                    rec.status = AgentStatus::Down;
                    rec.error = Some(e.message);
                }
            }
            t.put_agent(&rec)?;
            Ok(Some(rec))
        });
        let r = match (r, vms) {
            (Ok(Some(_)), Some(VmListing::Unchanged)) => Ok(Some(Checked::Unchanged)),
            (Ok(Some(rec)), Some(VmListing::Compared { comparison, tag })) => {
                let store = self.store.clone();
                let forgetting = self.forgetting();
                tokio::task::spawn_blocking(move || {
                    comparison.apply(&store, &rec, listed_at, &forgetting)
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Storage(format!("applying the listing: {e}"))))
                .map(|a| {
                    a.map(|Applied { settled, writes }| Checked::Read {
                        tag,
                        settled,
                        writes,
                    })
                })
            }
            // No longer registered, or down: nothing listed.
            (Ok(None), _) | (Ok(Some(_)), None | Some(VmListing::Unregistered)) => Ok(None),
            (Ok(Some(_)), Some(VmListing::Failed(e))) | (Err(e), _) => Err(e),
        };
        drop(turn);
        // The comparison is dropped: give what it took back (glibc keeps freed
        // heap), off the async workers (a trim of a large heap takes a while).
        if read >= TRIM_AFTER_VMS {
            tokio::task::spawn_blocking(crate::heap::trim);
        }
        let outcome = match r {
            Ok(Some(Checked::Unchanged)) => {
                self.listings.taken(id, listed_at);
                "unchanged"
            }
            Ok(Some(Checked::Read {
                tag,
                settled,
                writes,
            })) => {
                self.listings.listed(id, read, tag, settled, writes);
                self.listings.taken(id, listed_at);
                "read"
            }
            Ok(None) => {
                self.listings.forget(id);
                return;
            }
            Err(e) => {
                self.listings.forget(id);
                tracing::error!(agent = id, "cannot record the agent check: {e}");
                return;
            }
        };
        self.listing_counts
            .get_or_create(&crate::metrics::StateLabel {
                state: outcome.into(),
            })
            .inc();
    }

    /// Lists agent `id`'s VMs (its registration of `registered_ms`, through
    /// `c`) for a check. With the `tag` of its last settled listing, asks first
    /// whether the listing still has it (a one-VM page: 304 when it does).
    /// Otherwise waits for a turn to read a whole listing (`turn`, held until
    /// it is applied: each holds what it compares by, for every VM of the
    /// agent), reads the site's records of the agent's VMs, and compares the
    /// listing page by page as it comes ([`Comparison`], a few hash lookups
    /// per VM); `listed_at` is set to when it was taken. The probe and the
    /// listing share one deadline of [`CHECK_TIMEOUT`], which does not run
    /// during the wait and the read of the site's records: neither is the
    /// agent's fault.
    async fn list_vms<'a>(
        &'a self,
        c: &Client,
        id: &str,
        registered_ms: u64,
        tag: Option<&str>,
        turn: &mut Option<tokio::sync::SemaphorePermit<'a>>,
        listed_at: &mut u64,
    ) -> Result<VmListing, ApiError> {
        let late = || {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("agent {id} did not list its VMs within 15 s"),
            )
        };
        let mut left = CHECK_TIMEOUT;
        if let Some(tag) = tag {
            let t0 = std::time::Instant::now();
            let probe = tokio::time::timeout(
                left,
                c.get_pages_each::<serde::de::IgnoredAny>("/v1/vms?limit=1", 1, Some(tag), |_| {}),
            )
            .await
            .unwrap_or_else(|_| Err(late()))?;
            if matches!(probe, Paged::Unchanged) {
                return Ok(VmListing::Unchanged);
            }
            left = left.saturating_sub(t0.elapsed());
        }
        *turn = self.full_reads.acquire().await.ok();
        let store = self.store.clone();
        let (agent, url) = (id.to_string(), c.base().to_string());
        let begun = tokio::task::spawn_blocking(move || {
            Comparison::begin(&store, &agent, &url, registered_ms)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Storage(format!("reading the agent's VMs: {e}"))));
        let mut comparison = match begun {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(VmListing::Unregistered),
            Err(e) => return Ok(VmListing::Failed(e)),
        };
        // Records a job writes after the listing was taken are newer than it.
        *listed_at = now_ms();
        let read = tokio::time::timeout(
            left,
            c.get_pages_each("/v1/vms", usize::MAX, None, |page| comparison.page(page)),
        )
        .await
        .unwrap_or_else(|_| Err(late()))?;
        match read {
            Paged::Read { tag, .. } => Ok(VmListing::Compared { comparison, tag }),
            // Only a conditional read is answered 304.
            Paged::Unchanged => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "backend",
                format!("agent {id} answered 304 to a listing that named no tag"),
            )),
        }
    }

    /// Checks every agent every `period`, all at once: each check has its own
    /// deadline, so an agent that does not answer delays no other agent's check.
    pub fn spawn_health(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        self.health_period_ms.store(
            period.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let me = self.clone();
        tokio::spawn(async move {
            // Ended with this task (a stopped site sends none).
            let mut owed = tokio::task::JoinSet::new();
            for round in 0u64.. {
                // Releases owed, now and then (one round of them at a time): an
                // unregistered agent that was down may be back.
                while owed.try_join_next().is_some() {}
                if round % RELEASE_OWED_EVERY == 0 && owed.is_empty() {
                    let me = me.clone();
                    owed.spawn(async move { me.release_owed().await });
                }
                let ids: Vec<String> = me
                    .store
                    .agents()
                    .map(|a| a.into_iter().map(|a| a.id).collect())
                    .unwrap_or_default();
                let mut checks = tokio::task::JoinSet::new();
                for id in ids {
                    let me = me.clone();
                    checks.spawn(async move { me.check(&id).await });
                }
                while checks.join_next().await.is_some() {}
                tokio::time::sleep(period).await;
            }
        })
    }

    /// Submits an operation to an agent with an idempotency key (a retry after a
    /// site crash gets the same operation back) and waits for its end.
    pub async fn run_op(
        &self,
        agent: &str,
        path: &str,
        body: Value,
        key: &str,
    ) -> Result<Operation, OpError> {
        let c = self.client(agent).map_err(|e| agent_error(agent, e))?;
        // A lost answer is asked again with the same key: the agent answers the
        // operation the first attempt started, or starts it once.
        let mut attempt = 0;
        let mut op: Operation = loop {
            match c
                .call_with(
                    Method::POST,
                    path,
                    Some(&body),
                    &[("idempotency-key", key.to_string())],
                )
                .await
            {
                Ok(op) => break op,
                Err(e) if e.kind == "unavailable" && e.status == 503 && attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(agent, key, "retrying a submission: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(agent_error(agent, e)),
            }
        };
        let mut failures = 0;
        while op.state == OpState::Running {
            match c
                .get::<Operation>(&format!("/v1/operations/{}?wait-ms=20000", op.id))
                .await
            {
                Ok(o) => {
                    op = o;
                    failures = 0;
                }
                // An agent that stops answering mid-operation: keep asking a while.
                Err(e) if failures < 30 => {
                    failures += 1;
                    tracing::warn!(agent, op = op.id, "waiting for an operation: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(agent_error(agent, e)),
            }
        }
        match op.state {
            OpState::Succeeded => Ok(op),
            _ => Err(op
                .error
                .clone()
                .map(|e| OpError {
                    kind: e.kind,
                    message: format!("agent {agent}: {}", e.message),
                })
                .unwrap_or_else(|| OpError {
                    kind: "backend".into(),
                    message: format!("agent {agent}: operation {} failed", op.id),
                })),
        }
    }
}

/// Removes a VM record, giving its owner's quota back.
pub fn forget_vm(t: &mut super::store::Txn<'_>, v: &SiteVm) -> Result<(), StoreError> {
    if let Some(o) = &v.owner {
        t.move_usage(
            o,
            Usage::vm(u64::from(v.logical_cpus), v.main_memory_mib),
            Usage::default(),
        )?;
    }
    t.remove_vm(&v.id)
}

/// The lock of `id` in `locks`, made if there is none. The locks no one holds
/// or waits for are dropped whenever the map has doubled (from 64): ids of agents
/// long unregistered do not pile up.
fn lock_of(
    locks: &mut HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    id: &str,
) -> Arc<tokio::sync::Mutex<()>> {
    if !locks.contains_key(id) && locks.len() >= 64 && locks.len().is_power_of_two() {
        locks.retain(|_, l| Arc::strong_count(l) > 1);
    }
    locks.entry(id.to_string()).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_claim_locks_do_not_pile_up() {
        let mut locks = HashMap::new();
        let held = lock_of(&mut locks, "kept");
        // 10,000 ids come and go: the map stays within twice what is held, plus 64.
        for i in 0..10_000 {
            drop(lock_of(&mut locks, &format!("gone-{i}")));
            assert!(locks.len() <= 128, "{} locks for 1 held", locks.len());
        }
        // The one held is the one answered again, never dropped.
        assert!(locks.contains_key("kept"));
        assert!(Arc::ptr_eq(&held, &lock_of(&mut locks, "kept")));
    }

    /// A check builds a client from the agent's record; the agent re-registers
    /// at another URL before the client is kept: the old URL's client is not
    /// kept, and the next check reaches the new URL.
    #[test]
    fn a_client_built_before_a_re_registration_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("site.redb")).unwrap();
        let sealer = crate::sealing::Sealer::open_or_create(&dir.path().join("key")).unwrap();
        let rec = AgentRec::registered("a", "http://127.0.0.1:1", sealer.seal("secret"), None);
        store.write(|t| t.put_agent(&rec)).unwrap();
        let agents = Agents::new(
            store.clone(),
            "site".into(),
            "instance".into(),
            sealer,
            Default::default(),
            Default::default(),
        )
        .unwrap();
        let (generation, old) = agents.build_client("a").unwrap();
        store
            .write(|t| {
                t.put_agent(&AgentRec {
                    url: "http://127.0.0.1:2".into(),
                    ..rec.clone()
                })
            })
            .unwrap();
        agents.forget_client("a");
        agents.keep_client("a", generation, &old);
        assert_eq!(agents.client("a").unwrap().base(), "http://127.0.0.1:2");
        // Kept, with its registration, when nothing came in between.
        assert_eq!(agents.client("a").unwrap().base(), "http://127.0.0.1:2");
        assert_eq!(agents.clients.read().unwrap().len(), 1);
    }
}
