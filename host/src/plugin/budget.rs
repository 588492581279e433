//! Per-instance budgets for host resources.
//!
//! Everything a plugin instance holds on the host side is an entry in its store's
//! resource table: open files, directory listings, wasi:http header sets, requests,
//! responses and bodies, streams, libvirt connections, SHA-256 hashers. The budgets bound them while
//! the instance lives, counted across calls:
//!
//! - all entries together: the table's own capacity (`max-host-resources`);
//! - each costly kind at the point where the host creates one (`max-open-files`,
//!   `max-http-header-sets`, `max-http-requests`, `max-libvirt-connections`),
//!   checked by the capability module that creates it.
//!
//! A plugin that goes over a budget is stopped: its call fails with
//! [`PluginError::Budget`](super::PluginError::Budget) and the instance is discarded,
//! which closes everything it held. When a call ends, an instance still holding more
//! than a session keeps between calls is discarded too ([`pool`](super::pool)).

use std::any::Any;

use wasmtime::component::ResourceTable;

use super::caps::libvirt::Connection;
use super::state::HostState;

/// Budget names, as errors and logs say them.
pub const HOST_RESOURCES: &str = "host resources";
/// Open files and directory listings.
pub const OPEN_FILES: &str = "open files";
/// wasi:http header sets.
pub const HTTP_HEADER_SETS: &str = "HTTP header sets";
/// Outgoing HTTP requests in flight.
pub const HTTP_REQUESTS: &str = "HTTP requests in flight";
/// libvirt connections.
pub const LIBVIRT_CONNECTIONS: &str = "libvirt connections";

/// What an instance holds on the host side now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Every resource-table entry.
    pub total: usize,
    /// Open files and directories (each a host descriptor) and directory listings.
    pub files: usize,
    /// wasi:http header sets and requests being built.
    pub http_header_sets: usize,
    /// wasi:http responses awaited or received and bodies being read.
    pub http_exchanges: usize,
    /// libvirt connections.
    pub libvirt: usize,
}

/// Counts what the table of `state` holds, by kind.
pub fn holdings(state: &mut HostState) -> Holdings {
    count(state.table())
}

/// Counts the entries of `table` by kind (one pass, O(entries)).
pub fn count(table: &mut ResourceTable) -> Holdings {
    use wasmtime_wasi_http::p2::body::HostIncomingBody;
    use wasmtime_wasi_http::p2::types::{
        HostFutureIncomingResponse, HostIncomingResponse, HostOutgoingRequest,
    };
    let mut h = Holdings::default();
    for entry in table.iter_mut() {
        let e: &dyn Any = entry;
        h.total += 1;
        if e.is::<wasmtime_wasi::filesystem::Descriptor>()
            || e.is::<wasmtime_wasi::p2::ReaddirIterator>()
        {
            h.files += 1;
        } else if e.is::<wasmtime_wasi_http::FieldMap>() || e.is::<HostOutgoingRequest>() {
            h.http_header_sets += 1;
        } else if e.is::<HostFutureIncomingResponse>()
            || e.is::<HostIncomingResponse>()
            || e.is::<HostIncomingBody>()
        {
            h.http_exchanges += 1;
        } else if e.is::<Connection>() {
            h.libvirt += 1;
        }
    }
    h
}
