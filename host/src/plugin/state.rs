//! The data each plugin store carries: WASI context, the capability policies lent to
//! this plugin, and the limiter.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::caps::{
    guest_channel::GuestChannelCap, http::HttpPolicy, libvirt::LibvirtCap, Policies,
};
use super::error::Result;
use super::limits::Limiter;

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
}

impl HostState {
    /// Builds the store data for one instance of `plugin` under `policies`.
    pub fn new(plugin: Arc<str>, policies: &Policies, memory_cap: usize) -> Result<HostState> {
        let wasi = super::caps::files::wasi_ctx(&plugin, &policies.effective.directories)?;
        Ok(HostState {
            plugin: plugin.clone(),
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_policy: policies.http.clone(),
            config: policies.config.clone(),
            libvirt: policies.libvirt.clone(),
            guest_channel: policies.guest_channel.clone(),
            limiter: Limiter::new(memory_cap),
        })
    }

    /// The resource table (libvirt connections live here).
    pub fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
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
