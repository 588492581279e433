//! libvirt capability: connections the host opens with libvirt's C library (the
//! `virt` crate) for the URIs the operator granted to the plugin. A URI not on the
//! list is refused with `denied` before any connection is made; migration
//! destinations are checked the same way. Every libvirt call runs on a blocking
//! thread with the plugin's call budget, so a hung libvirtd cannot stall the executor;
//! a call long by nature (a migration, a full volume copy) with the plugin's
//! long-call budget (`long-call-timeout-ms`), which its call does not count.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirtDomain;
use virt::error::{ErrorDomain, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use wasmtime::component::Resource;

use super::libvirt_stranded::{Key, Stranded, LONG};
use crate::plugin::bindings::gve::hypervisor::libvirt::{
    Domain, DomainState, Host, HostConnection, MigrateFlags, NodeInfo, UndefineFlags, Volume,
};
use crate::plugin::bindings::types::Error;
use crate::plugin::state::HostState;

/// What one plugin may open.
#[derive(Clone, Debug)]
pub struct LibvirtCap {
    plugin: Arc<str>,
    allowed: Arc<Vec<String>>,
    timeout: Duration,
    stranded: Stranded,
}

impl LibvirtCap {
    /// The capability of `plugin`: exactly the URIs in `allowed`.
    pub fn new(plugin: Arc<str>, allowed: Vec<String>, timeout: Duration) -> LibvirtCap {
        LibvirtCap {
            plugin,
            allowed: Arc::new(allowed),
            timeout,
            stranded: Stranded::default(),
        }
    }

    /// Refuses a URI that is not granted, naming the plugin and what is granted.
    pub fn check(&self, uri: &str) -> Result<(), Error> {
        if self.allowed.iter().any(|g| g == uri) {
            return Ok(());
        }
        let granted = if self.allowed.is_empty() {
            "none".to_string()
        } else {
            self.allowed.join(", ")
        };
        let uri: String = uri.chars().take(256).collect();
        Err(Error::Denied(format!(
            "libvirt URI '{uri}' is not granted to plugin '{}' (granted: {granted})",
            self.plugin
        )))
    }
}

/// An open libvirt connection, closed when the plugin drops it.
pub struct Connection {
    uri: String,
    conn: Arc<Reconnecting>,
}

/// A connection that is opened anew when libvirt says it died (its daemon restarted,
/// or the way to it broke): the call that saw it die fails `unavailable`, the next
/// one reconnects, so a plugin's session outlives a libvirtd restart.
struct Reconnecting {
    uri: String,
    current: std::sync::Mutex<Arc<Conn>>,
}

impl Reconnecting {
    /// The live connection (blocking: may reconnect).
    fn get(&self) -> Result<Arc<Conn>, Error> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // Only a definite "dead" reconnects; a driver that cannot tell keeps its own.
        if matches!(current.0.is_alive(), Ok(false)) {
            *current = Arc::new(open_blocking(&self.uri)?);
        }
        Ok(current.clone())
    }
}

/// `virt::connect::Connect` closes nothing on drop; this does. With it go the
/// domains it looked up for guest-agent commands ([`Conn::agent_command`]).
struct Conn(Connect, std::sync::Mutex<HashMap<String, VirtDomain>>);

/// Domains a connection keeps looked up for guest-agent commands, at most.
const AGENT_DOMAINS: usize = 1024;

impl Conn {
    fn new(c: Connect) -> Conn {
        Conn(c, Default::default())
    }

    /// Sends a guest-agent command to `domain`, looked up once and then kept
    /// when named by UUID: an exec is several commands (guest-exec, then status
    /// polls) and each lookup is a round trip to libvirtd (`bench/guest.rs`).
    /// Only UUIDs are kept: a handle stands for its domain's UUID, so one kept
    /// by name would reach a renamed domain instead of a newcomer under its old
    /// name. A kept handle whose domain is gone answers "no domain" before
    /// anything reaches a guest; it is looked up again once (and forgotten if
    /// that fails too) before the error stands.
    fn agent_command(
        &self,
        domain: &str,
        command: &str,
        timeout_seconds: i32,
    ) -> Result<String, Error> {
        let kept = self
            .1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(domain)
            .cloned();
        if let Some(d) = kept {
            match d.qemu_agent_command(command, timeout_seconds, 0) {
                Err(e) if e.code() == ErrorNumber::NoDomain => {}
                r => return r.map_err(map_err),
            }
        }
        let d = match lookup(&self.0, domain) {
            Ok(d) => d,
            Err(e) => {
                self.1
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(domain);
                return Err(e);
            }
        };
        if is_uuid(domain) {
            let mut kept = self.1.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() >= AGENT_DOMAINS {
                kept.clear();
            }
            kept.insert(domain.to_string(), d.clone());
        }
        d.qemu_agent_command(command, timeout_seconds, 0)
            .map_err(map_err)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

fn quiet_libvirt() {
    // libvirt prints every error to stderr by default; errors reach the plugin instead.
    crate::libvirt_log::route_to_log();
}

/// Maps a libvirt error to the contract's error kinds.
/// A libvirt error as the contract's error.
pub(super) fn map_err(e: virt::error::Error) -> Error {
    let m = format!("libvirt: {}", e.message());
    // The way to libvirtd failed (refused, reset, closed, keepalive lost): the
    // daemon is out of reach, the request may be fine. Errors the daemon reports
    // for its hypervisor carry that driver's domain instead.
    if e.domain() == ErrorDomain::Rpc
        && matches!(
            e.code(),
            ErrorNumber::SystemError | ErrorNumber::Rpc | ErrorNumber::InternalError
        )
    {
        return Error::Unavailable(m);
    }
    match e.code() {
        ErrorNumber::NoDomain
        | ErrorNumber::NoStorageVolume
        | ErrorNumber::NoStoragePool
        | ErrorNumber::NoDomainSnapshot
        | ErrorNumber::NoNetwork => Error::NotFound(m),
        ErrorNumber::DomExist | ErrorNumber::StorageVolExist => Error::AlreadyExists(m),
        ErrorNumber::InvalidArg | ErrorNumber::XmlError | ErrorNumber::XmlDetail => {
            Error::InvalidArgument(m)
        }
        ErrorNumber::OperationInvalid => Error::InvalidState(m),
        ErrorNumber::NoSupport | ErrorNumber::ArgumentUnsupported => Error::Unsupported(m),
        ErrorNumber::AuthFailed
        | ErrorNumber::AuthCancelled
        | ErrorNumber::AccessDenied
        | ErrorNumber::OperationDenied => Error::Denied(m),
        ErrorNumber::OperationTimeout | ErrorNumber::AgentCommandTimeout => Error::Timeout(m),
        ErrorNumber::NoConnect
        | ErrorNumber::AgentUnresponsive
        | ErrorNumber::AgentUnsynced
        | ErrorNumber::OperationUnsupported => Error::Unavailable(m),
        _ => Error::Backend(m),
    }
}

/// Refuses strings libvirt's C API cannot take (the `virt` crate panics on them).
fn no_nul(args: &[&str]) -> Result<(), Error> {
    match args.iter().find(|a| a.contains('\0')) {
        Some(_) => Err(Error::InvalidArgument(
            "argument contains a NUL byte".into(),
        )),
        None => Ok(()),
    }
}

/// Whether `domain` names a domain by its UUID (else by its name).
fn is_uuid(domain: &str) -> bool {
    domain.len() == 36 && domain.chars().filter(|&ch| ch == '-').count() == 4
}

/// A domain by name or UUID.
pub(super) fn lookup(c: &Connect, domain: &str) -> Result<VirtDomain, Error> {
    let r = if is_uuid(domain) {
        VirtDomain::lookup_by_uuid_string(c, domain)
    } else {
        VirtDomain::lookup_by_name(c, domain)
    };
    r.map_err(map_err)
}

/// How long one call asks domains' info again while libxl has lost track of them
/// (see [`info_of`]): one window for all the domains of a listing.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// The domain's virDomainInfo. libvirt's libxl driver asks Xen for a domain's info
/// while it takes the domain for active, and fails ("libxl_domain_info failed")
/// when Xen has already removed it: a moment at the end of every shutdown (libvirt
/// reports it shut off, then destroys it in Xen with the domain unlocked, then
/// forgets its id), and until it handles the death of a domain destroyed behind
/// its back. Such an error is asked past until `until` (the call's
/// [`CATCH_UP_WAIT`]): the domain is then described as it is, not answered as a
/// backend error.
fn info_of(d: &VirtDomain, until: Instant) -> Result<virt::domain::DomainInfo, Error> {
    let lost_track = |e: &virt::error::Error| {
        e.domain() == ErrorDomain::Libxl && e.code() == ErrorNumber::InternalError
    };
    patiently(until, || d.get_info(), lost_track).map_err(map_err)
}

/// `get()`'s answer, asked again every 50 ms until `end` while it fails with an
/// error `passing` says passes.
fn patiently<T, E>(
    end: Instant,
    mut get: impl FnMut() -> Result<T, E>,
    passing: impl Fn(&E) -> bool,
) -> Result<T, E> {
    loop {
        match get() {
            Err(e) if passing(&e) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(50));
            }
            answer => return answer,
        }
    }
}

/// The domain as libvirt has it.
fn describe(d: &VirtDomain) -> Result<Domain, Error> {
    describe_until(d, Instant::now() + CATCH_UP_WAIT)
}

/// The domain as libvirt has it, waiting for libxl to catch up until `until`.
fn describe_until(d: &VirtDomain, until: Instant) -> Result<Domain, Error> {
    let info = info_of(d, until)?;
    let state = match info.state {
        1 => DomainState::Running,
        2 => DomainState::Blocked,
        3 => DomainState::Paused,
        4 => DomainState::Shutdown,
        5 => DomainState::Shutoff,
        6 => DomainState::Crashed,
        7 => DomainState::PmSuspended,
        _ => DomainState::NoState,
    };
    Ok(Domain {
        name: d.get_name().map_err(map_err)?,
        uuid: d.get_uuid_string().map_err(map_err)?,
        id: d.get_id(),
        state,
        persistent: d.is_persistent().map_err(map_err)?,
        has_managed_save: d.has_managed_save(0).unwrap_or(false),
        max_memory_kib: info.max_mem,
        memory_kib: info.memory,
        vcpus: info.nr_virt_cpu,
    })
}

fn volume(v: &StorageVol) -> Result<Volume, Error> {
    let info = v.get_info().map_err(map_err)?;
    Ok(Volume {
        name: v.get_name().map_err(map_err)?,
        path: v.get_path().map_err(map_err)?,
        capacity_bytes: info.capacity,
        allocation_bytes: info.allocation,
    })
}

fn pool(c: &Connect, name: &str) -> Result<StoragePool, Error> {
    StoragePool::lookup_by_name(c, name).map_err(map_err)
}

fn migrate_flags(f: MigrateFlags) -> u32 {
    use virt::sys::*;
    let table = [
        (MigrateFlags::LIVE, VIR_MIGRATE_LIVE),
        (MigrateFlags::PEER_TO_PEER, VIR_MIGRATE_PEER2PEER),
        (MigrateFlags::TUNNELLED, VIR_MIGRATE_TUNNELLED),
        (MigrateFlags::PERSIST_DESTINATION, VIR_MIGRATE_PERSIST_DEST),
        (MigrateFlags::UNDEFINE_SOURCE, VIR_MIGRATE_UNDEFINE_SOURCE),
        (MigrateFlags::NON_SHARED_DISK, VIR_MIGRATE_NON_SHARED_DISK),
        (
            MigrateFlags::NON_SHARED_INCREMENTAL,
            VIR_MIGRATE_NON_SHARED_INC,
        ),
        (MigrateFlags::AUTO_CONVERGE, VIR_MIGRATE_AUTO_CONVERGE),
        (MigrateFlags::UNSAFE_MIGRATION, VIR_MIGRATE_UNSAFE),
    ];
    table
        .iter()
        .filter(|(w, _)| f.contains(*w))
        .fold(0, |acc, (_, v)| acc | *v)
}

fn undefine_flags(f: UndefineFlags) -> u32 {
    use virt::sys::*;
    let mut v = 0;
    if f.contains(UndefineFlags::MANAGED_SAVE) {
        v |= VIR_DOMAIN_UNDEFINE_MANAGED_SAVE;
    }
    if f.contains(UndefineFlags::SNAPSHOTS_METADATA) {
        v |= VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    }
    if f.contains(UndefineFlags::NVRAM) {
        v |= VIR_DOMAIN_UNDEFINE_NVRAM;
    }
    v
}

fn open_blocking(uri: &str) -> Result<Conn, Error> {
    quiet_libvirt();
    Connect::open(Some(uri)).map(Conn::new).map_err(map_err)
}

impl HostState {
    /// Runs `f` on the connection behind `this` on a blocking thread, within the
    /// plugin's call budget; a call long by nature ([`LONG`]) within what is left
    /// of its long-call budget instead, not charged to the call
    /// ([`Limiter::begin_long`](crate::plugin::limits::Limiter::begin_long)).
    async fn on_conn<T: Send + 'static>(
        &mut self,
        this: &Resource<Connection>,
        op: &'static str,
        f: impl FnOnce(&Connect) -> Result<T, Error> + Send + 'static,
    ) -> wasmtime::Result<Result<T, Error>> {
        let conn = self.table().get(this)?.conn.clone();
        let key = Key::new(&conn.uri, false);
        let long = if LONG.contains(&op) {
            self.limiter.begin_long()
        } else {
            None
        };
        let left = long
            .as_ref()
            .map_or_else(|| self.limiter.host_wait(), |w| w.limit());
        let r = self
            .libvirt
            .blocking_within(op, key, left, long.is_some(), move || f(&conn.get()?.0))
            .await;
        if let Some(w) = long {
            self.limiter.end_long(w);
        }
        Ok(r)
    }
}

impl LibvirtCap {
    /// Runs `f` on a blocking thread; answers `timeout` after `limit` (at most the
    /// call budget, unless `long`: a long call's wait; callers pass at most what
    /// is left of the call, less what the plugin needs to act on the answer, and
    /// of its long-call budget) even if libvirt has not, so a hung call cannot
    /// hold the plugin. Its thread finishes, or fails, on its own later,
    /// counted as stranded under `key` until then; while too many are, nothing
    /// more is started there ([`Stranded`]). Nothing is started with no time left.
    async fn blocking_within<T: Send + 'static>(
        &self,
        op: &'static str,
        key: Key,
        limit: Duration,
        long: bool,
        f: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let limit = if long { limit } else { limit.min(self.timeout) };
        if limit.is_zero() {
            return Err(Error::Timeout(format!(
                "libvirt {op} not started: the plugin's call has no time left for it"
            )));
        }
        let (claim, watch) = self.stranded.start(key, op)?;
        // The answer comes back on a channel, so that one nobody waits for any more
        // (an opened connection, whose close may block) is dropped on its thread.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(claim);
            let _ = tx.send(r);
        });
        // A wait cut off from outside drops `watch` too: the call is stranded.
        let mut rx = std::pin::pin!(rx);
        match tokio::time::timeout(limit, rx.as_mut()).await {
            Ok(Ok(r)) => {
                watch.answered();
                r
            }
            Ok(Err(_)) => {
                watch.answered();
                Err(Error::Backend(format!(
                    "libvirt {op} ended on its thread without answering (it panicked)"
                )))
            }
            Err(_) => {
                // An answer that came as the time ran out is taken, not dropped here.
                rx.close();
                if let Ok(r) = rx.try_recv() {
                    watch.answered();
                    return r;
                }
                drop(watch);
                Err(Error::Timeout(format!(
                    "libvirt {op} did not answer within {limit:?}"
                )))
            }
        }
    }
}

impl Host for HostState {}

/// Implements a connection method: NUL-checks the string arguments, then runs the
/// body on the connection's blocking thread.
macro_rules! conn_op {
    ($self:ident, $this:ident, $op:literal, [$($s:ident),*], |$c:ident| $body:expr) => {{
        $(let $s: String = $s;)*
        if let Err(e) = no_nul(&[$($s.as_str()),*]) {
            return Ok(Err(e));
        }
        $self.on_conn(&$this, $op, move |$c: &Connect| $body).await
    }};
}

impl HostConnection for HostState {
    async fn open(&mut self, uri: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        if let Err(e) = self.libvirt.check(&uri).and_then(|_| no_nul(&[&uri])) {
            self.refused("libvirt URI refused: not granted", &uri);
            return Ok(Err(e));
        }
        let limit = self.limits.max_libvirt_connections;
        if crate::plugin::budget::holdings(self).libvirt >= limit as usize {
            return Err(self
                .limiter
                .over_budget(crate::plugin::budget::LIBVIRT_CONNECTIONS, u64::from(limit)));
        }
        let u = uri.clone();
        let key = Key::new(&uri, false);
        let left = self.limiter.host_wait();
        match self
            .libvirt
            .blocking_within("open", key, left, false, move || open_blocking(&u))
            .await
        {
            Ok(conn) => Ok(Ok(self.table().push(Connection {
                conn: Arc::new(Reconnecting {
                    uri: uri.clone(),
                    current: std::sync::Mutex::new(Arc::new(conn)),
                }),
                uri,
            })?)),
            Err(e) => Ok(Err(e)),
        }
    }

    async fn uri(&mut self, this: Resource<Connection>) -> wasmtime::Result<String> {
        Ok(self.table().get(&this)?.uri.clone())
    }

    async fn hostname(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<String, Error>> {
        conn_op!(self, this, "hostname", [], |c| c
            .get_hostname()
            .map_err(map_err))
    }

    async fn hypervisor_type(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<String, Error>> {
        conn_op!(self, this, "hypervisor-type", [], |c| c
            .get_type()
            .map_err(map_err))
    }

    async fn hypervisor_version(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<String, Error>> {
        conn_op!(self, this, "hypervisor-version", [], |c| {
            let v = c.get_hyp_version().map_err(map_err)?;
            Ok(format!(
                "{}.{}.{}",
                v / 1_000_000,
                (v / 1000) % 1000,
                v % 1000
            ))
        })
    }

    async fn node_info(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<NodeInfo, Error>> {
        conn_op!(self, this, "node-info", [], |c| {
            let n = c.get_node_info().map_err(map_err)?;
            Ok(NodeInfo {
                model: n.model,
                memory_kib: n.memory,
                cpus: n.cpus,
                mhz: n.mhz,
                nodes: n.nodes,
                sockets: n.sockets,
                cores: n.cores,
                threads: n.threads,
            })
        })
    }

    async fn node_free_memory(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        conn_op!(self, this, "node-free-memory", [], |c| c
            .get_free_memory()
            .map_err(map_err))
    }

    async fn list_domains(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<Vec<Domain>, Error>> {
        conn_op!(self, this, "list-domains", [], |c| {
            let all = c.list_all_domains(0).map_err(map_err)?;
            let mut out = Vec::with_capacity(all.len());
            let until = Instant::now() + CATCH_UP_WAIT;
            for d in &all {
                match describe_until(d, until) {
                    Ok(x) => out.push(x),
                    // Destroyed or undefined between the listing and its
                    // description: not there any more, so left out (a VM going
                    // away must not fail the whole listing, nor a health check).
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    async fn lookup_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<Domain, Error>> {
        conn_op!(self, this, "lookup-domain", [domain], |c| describe(
            &lookup(c, &domain)?
        ))
    }

    async fn domain_xml(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        inactive: bool,
    ) -> wasmtime::Result<Result<String, Error>> {
        conn_op!(self, this, "domain-xml", [domain], |c| {
            let flags = if inactive {
                virt::sys::VIR_DOMAIN_XML_INACTIVE
            } else {
                0
            };
            lookup(c, &domain)?.get_xml_desc(flags).map_err(map_err)
        })
    }

    async fn define_domain(
        &mut self,
        this: Resource<Connection>,
        xml: String,
    ) -> wasmtime::Result<Result<Domain, Error>> {
        conn_op!(self, this, "define-domain", [xml], |c| {
            describe(&VirtDomain::define_xml(c, &xml).map_err(map_err)?)
        })
    }

    async fn undefine_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        flags: UndefineFlags,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "undefine-domain", [domain], |c| {
            lookup(c, &domain)?
                .undefine_flags(undefine_flags(flags))
                .map_err(map_err)
        })
    }

    async fn start_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<Domain, Error>> {
        conn_op!(self, this, "start-domain", [domain], |c| {
            let d = lookup(c, &domain)?;
            d.create().map_err(map_err)?;
            describe(&d)
        })
    }

    async fn shutdown_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "shutdown-domain", [domain], |c| {
            lookup(c, &domain)?.shutdown().map(drop).map_err(map_err)
        })
    }

    async fn destroy_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "destroy-domain", [domain], |c| lookup(
            c, &domain
        )?
        .destroy()
        .map_err(map_err))
    }

    async fn suspend_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "suspend-domain", [domain], |c| {
            lookup(c, &domain)?.suspend().map(drop).map_err(map_err)
        })
    }

    async fn resume_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "resume-domain", [domain], |c| {
            lookup(c, &domain)?.resume().map(drop).map_err(map_err)
        })
    }

    async fn managed_save(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "managed-save", [domain], |c| {
            lookup(c, &domain)?
                .managed_save(0)
                .map(drop)
                .map_err(map_err)
        })
    }

    async fn migrate_domain(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        destination_uri: String,
        flags: MigrateFlags,
        bandwidth_mibps: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        if let Err(e) = self.libvirt.check(&destination_uri) {
            self.refused(
                "libvirt migration URI refused: not granted",
                &destination_uri,
            );
            return Ok(Err(e));
        }
        let p2p = flags.contains(MigrateFlags::PEER_TO_PEER);
        conn_op!(
            self,
            this,
            "migrate-domain",
            [domain, destination_uri],
            |c| {
                let d = lookup(c, &domain)?;
                let f = migrate_flags(flags);
                if p2p {
                    d.migrate_to_uri(&destination_uri, f, None, bandwidth_mibps)
                        .map_err(map_err)
                } else {
                    // The typed-parameter API: libxl implements only its
                    // Begin3Params/Prepare3Params... steps, not virDomainMigrate's.
                    let dest = open_blocking(&destination_uri)?;
                    let params = virt::domain::MigrateParameters {
                        bandwidth: (bandwidth_mibps > 0).then_some(bandwidth_mibps),
                        ..Default::default()
                    };
                    d.migrate3(&dest.0, params, f).map(drop).map_err(map_err)
                }
            }
        )
    }

    async fn create_snapshot(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        xml: String,
    ) -> wasmtime::Result<Result<String, Error>> {
        conn_op!(self, this, "create-snapshot", [domain, xml], |c| {
            let d = lookup(c, &domain)?;
            let s =
                virt::domain_snapshot::DomainSnapshot::create_xml(&d, &xml, 0).map_err(map_err)?;
            s.get_name().map_err(map_err)
        })
    }

    async fn list_snapshots(
        &mut self,
        this: Resource<Connection>,
        domain: String,
    ) -> wasmtime::Result<Result<Vec<String>, Error>> {
        conn_op!(self, this, "list-snapshots", [domain], |c| {
            let d = lookup(c, &domain)?;
            let all = d.list_all_snapshots(0).map_err(map_err)?;
            all.iter().map(|s| s.get_name().map_err(map_err)).collect()
        })
    }

    async fn revert_snapshot(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        snapshot: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "revert-snapshot", [domain, snapshot], |c| {
            let d = lookup(c, &domain)?;
            let s = virt::domain_snapshot::DomainSnapshot::lookup_by_name(&d, &snapshot, 0)
                .map_err(map_err)?;
            s.revert(0).map_err(map_err)
        })
    }

    async fn delete_snapshot(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        snapshot: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "delete-snapshot", [domain, snapshot], |c| {
            let d = lookup(c, &domain)?;
            let s = virt::domain_snapshot::DomainSnapshot::lookup_by_name(&d, &snapshot, 0)
                .map_err(map_err)?;
            s.delete(0).map_err(map_err)
        })
    }

    async fn list_storage_pools(
        &mut self,
        this: Resource<Connection>,
    ) -> wasmtime::Result<Result<Vec<String>, Error>> {
        conn_op!(self, this, "list-storage-pools", [], |c| {
            let pools = c.list_all_storage_pools(0).map_err(map_err)?;
            pools
                .iter()
                .map(|p| p.get_name().map_err(map_err))
                .collect()
        })
    }

    async fn refresh_storage_pool(
        &mut self,
        this: Resource<Connection>,
        name: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "refresh-storage-pool", [name], |c| {
            pool(c, &name)?.refresh(0).map(drop).map_err(map_err)
        })
    }

    async fn list_volumes(
        &mut self,
        this: Resource<Connection>,
        name: String,
    ) -> wasmtime::Result<Result<Vec<Volume>, Error>> {
        conn_op!(self, this, "list-volumes", [name], |c| {
            let vols = pool(c, &name)?.list_all_volumes(0).map_err(map_err)?;
            vols.iter().map(volume).collect()
        })
    }

    async fn lookup_volume(
        &mut self,
        this: Resource<Connection>,
        path: String,
    ) -> wasmtime::Result<Result<Volume, Error>> {
        conn_op!(self, this, "lookup-volume", [path], |c| {
            volume(&StorageVol::lookup_by_path(c, &path).map_err(map_err)?)
        })
    }

    async fn create_volume(
        &mut self,
        this: Resource<Connection>,
        name: String,
        xml: String,
    ) -> wasmtime::Result<Result<Volume, Error>> {
        conn_op!(self, this, "create-volume", [name, xml], |c| {
            volume(&StorageVol::create_xml(&pool(c, &name)?, &xml, 0).map_err(map_err)?)
        })
    }

    async fn clone_volume(
        &mut self,
        this: Resource<Connection>,
        name: String,
        xml: String,
        source_path: String,
    ) -> wasmtime::Result<Result<Volume, Error>> {
        conn_op!(self, this, "clone-volume", [name, xml, source_path], |c| {
            let src = StorageVol::lookup_by_path(c, &source_path).map_err(map_err)?;
            volume(&StorageVol::create_xml_from(&pool(c, &name)?, &xml, &src, 0).map_err(map_err)?)
        })
    }

    async fn delete_volume(
        &mut self,
        this: Resource<Connection>,
        path: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "delete-volume", [path], |c| {
            let vol = match StorageVol::lookup_by_path(c, &path) {
                Ok(v) => v,
                // On shared storage another host may have made the file since this
                // host last scanned its pools (a VM migrated here keeps its disk
                // where it was made): rescan them, then look again.
                Err(_) => {
                    let active = virt::sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE;
                    for pool in c.list_all_storage_pools(active).unwrap_or_default() {
                        let _ = pool.refresh(0);
                    }
                    StorageVol::lookup_by_path(c, &path).map_err(map_err)?
                }
            };
            vol.delete(0).map_err(map_err)
        })
    }

    async fn upload_volume(
        &mut self,
        this: Resource<Connection>,
        path: String,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "upload-volume", [path], |c| {
            super::libvirt_io::upload(c, &path, offset, &data)
        })
    }

    async fn download_volume(
        &mut self,
        this: Resource<Connection>,
        path: String,
        offset: u64,
        length: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        conn_op!(self, this, "download-volume", [path], |c| {
            super::libvirt_io::download(c, &path, offset, length)
        })
    }

    async fn attach_device(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        xml: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "attach-device", [domain, xml], |c| {
            super::libvirt_io::change_disk(c, &domain, &xml, true)
        })
    }

    async fn detach_device(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        xml: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        conn_op!(self, this, "detach-device", [domain, xml], |c| {
            super::libvirt_io::change_disk(c, &domain, &xml, false)
        })
    }

    async fn qemu_agent_command(
        &mut self,
        this: Resource<Connection>,
        domain: String,
        command: String,
        timeout_seconds: i32,
    ) -> wasmtime::Result<Result<String, Error>> {
        if let Err(e) = no_nul(&[domain.as_str(), command.as_str()]) {
            return Ok(Err(e));
        }
        // libvirt precedes every agent command with a guest-sync of its own (5 s):
        // the caller's timeout is enforced here, not left to libvirt.
        let limit = Duration::from_secs(u64::try_from(timeout_seconds.max(1)).unwrap_or(1))
            .min(self.limiter.host_wait());
        let conn = self.table().get(&this)?.conn.clone();
        let key = Key::new(&conn.uri, true);
        // libvirt is told the shorter wait too, so a command given up on here does
        // not hold the guest agent (and the plugin's next command) much longer.
        let seconds = i32::try_from(limit.as_secs().max(1))
            .unwrap_or(i32::MAX)
            .min(timeout_seconds.max(1));
        Ok(self
            .libvirt
            .blocking_within("qemu-agent-command", key, limit, false, move || {
                conn.get()?.agent_command(&domain, &command, seconds)
            })
            .await)
    }

    async fn drop(&mut self, this: Resource<Connection>) -> wasmtime::Result<()> {
        let conn = self.table().delete(this)?;
        // Closing a connection can block on a hung daemon: not on the executor.
        tokio::task::spawn_blocking(move || drop(conn));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_that_passes_is_asked_past_and_no_other() {
        // Two passing errors, then the answer: asked three times, ~100 ms.
        let mut n = 0;
        let t = Instant::now();
        let r = patiently(
            Instant::now() + Duration::from_secs(2),
            || {
                n += 1;
                if n < 3 {
                    Err("gone")
                } else {
                    Ok(n)
                }
            },
            |e| *e == "gone",
        );
        assert_eq!(r, Ok(3));
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        // Another error is answered at once.
        let mut n = 0;
        let r: Result<(), &str> = patiently(
            Instant::now() + Duration::from_secs(2),
            || {
                n += 1;
                Err("broken")
            },
            |e| *e == "gone",
        );
        assert_eq!((r, n), (Err("broken"), 1));
        // A passing error that stays is answered once the wait is over.
        let t = Instant::now();
        let r: Result<(), &str> = patiently(
            t + Duration::from_millis(300),
            || Err("gone"),
            |e| *e == "gone",
        );
        assert_eq!(r, Err("gone"));
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn refuses_ungranted_uris_by_name() {
        let cap = LibvirtCap::new(
            "kvm".into(),
            vec!["test:///default".into()],
            Duration::from_secs(1),
        );
        assert!(cap.check("test:///default").is_ok());
        let Err(Error::Denied(m)) = cap.check("qemu:///system") else {
            panic!("not denied")
        };
        assert!(
            m.contains("qemu:///system") && m.contains("kvm") && m.contains("test:///default"),
            "{m}"
        );
        assert!(no_nul(&["a\0b"]).is_err());
    }
}
