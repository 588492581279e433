//! The data each plugin store carries: WASI context, the capability policies lent to
//! this plugin, its budgets and the limiter.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::caps::{
    guest_channel::GuestChannelCap, http::HttpPolicy, libvirt::LibvirtCap, log::LogBudget, Policies,
};
use super::error::Result;
use super::grants::Limits;
use super::limits::Limiter;

/// Largest wasi:http header set (all names and values of one `fields`), bytes.
pub const HTTP_FIELDS_MAX_BYTES: usize = 64 * 1024;

/// Store data of one plugin instance.
pub struct HostState {
    /// Plugin name, for logs and errors.
    pub plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    http_policy: HttpPolicy,
    /// The plugin's configuration values.
    pub config: Arc<std::collections::BTreeMap<String, String>>,
    /// libvirt access.
    pub libvirt: LibvirtCap,
    /// In-guest agent access.
    pub guest_channel: GuestChannelCap,
    /// Memory cap and call deadline.
    pub limiter: Limiter,
    /// The instance's budgets.
    pub limits: Limits,
    /// Log bytes written in the current call.
    pub log: LogBudget,
}

impl HostState {
    /// Builds the store data for one instance of `plugin` under `policies` and `limits`.
    pub fn new(plugin: Arc<str>, policies: &Policies, limits: &Limits) -> Result<HostState> {
        let wasi = super::caps::files::wasi_ctx(&plugin, &policies.effective.directories)?;
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_host_resources as usize);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(HTTP_FIELDS_MAX_BYTES);
        let limiter = Limiter::new((limits.memory_mib as usize) << 20);
        Ok(HostState {
            plugin: plugin.clone(),
            wasi,
            table,
            http,
            http_policy: policies.http.for_instance(limiter.entry_deadline()),
            config: policies.config.clone(),
            libvirt: policies.libvirt.clone(),
            guest_channel: policies.guest_channel.clone(),
            limiter,
            limits: *limits,
            log: LogBudget::new(u64::from(limits.log_kib_per_call) << 10),
        })
    }

    /// The resource table (libvirt connections live here).
    pub fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// Logs that the host refused something this instance asked for. The line counts
    /// against the instance's per-call log budget, so refusals in a loop cannot flood
    /// the host's log.
    pub fn refused(&mut self, what: &str, detail: &str) {
        let mut cut = detail.len().min(256);
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        let detail = &detail[..cut];
        if self.log.admit(what.len() + detail.len() + 64) {
            tracing::warn!(plugin = &*self.plugin, detail, "{what}");
        }
    }

    /// Outgoing HTTP requests of this instance whose connection is still open.
    pub fn http_in_flight(&self) -> usize {
        self.http_policy.in_flight()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}
