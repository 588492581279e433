//! Capabilities lent to plugins, one module each, each with its own policy check.
//!
//! | module | what | policy |
//! |---|---|---|
//! | [`log`] | log lines tagged with the plugin name | always; lines capped in size, bytes per call capped |
//! | [`config`] | the plugin's own config values | always; only its own |
//! | [`deadline`] | the time left in the current call; sleeps on the long-call budget | always; only its own call; long sleeps only in creates, clones and migrations |
//! | [`digest`] | SHA-256 computed natively | always; hashers are resource-table entries |
//! | [`http`] | outgoing wasi:http | strict authority allow-list checked before DNS, resolved addresses pinned; every phase timed out; requests in flight and header sets budgeted |
//! | [`libvirt`] | libvirt connections | URI allow-list, checked before connecting; calls off the executor, within the call budget (long calls within the long-call budget); connections budgeted |
//! | [`libvirt_io`] | volume bytes through libvirt streams, live disk attach/detach | at most 8 MiB a call, never past a volume's end; only file disks whose source is a pool volume; live only |
//! | [`libvirt_stranded`] | libvirt calls the host stopped waiting for whose threads still run | once 8 calls on a URI are stranded every call there is refused as `unavailable`; long calls (migration, snapshot, clone, ...) count apart (32) and hold back only long calls; guest-agent commands likewise (128) |
//! | [`guest_channel`] | in-guest agent of a VM via its driver | granted or refused |
//! | [`files`] | preopened directories (WASI) | only granted directories, read-only by default; no symlink creation; open files budgeted |
//! | [`clocks`] | timers (WASI `subscribe-duration`) | never early; waits of 0.5 ms or more end in `nanosleep` (at most 2 ms of a blocking thread each), shorter ones on tokio's 1 ms timer |

pub mod clocks;
pub mod config;
pub mod deadline;
pub mod digest;
pub mod files;
pub mod guest_channel;
pub mod http;
pub mod libvirt;
pub mod libvirt_io;
pub mod libvirt_stranded;
pub mod log;

use std::collections::BTreeMap;
use std::sync::Arc;

use super::grants::Effective;

/// Everything one plugin version is lent, shared by all its instances.
#[derive(Clone)]
pub struct Policies {
    /// The grants it gets (grants intersected with the manifest's requests).
    pub effective: Arc<Effective>,
    /// Config values.
    pub config: Arc<BTreeMap<String, String>>,
    /// HTTP allow-list hook.
    pub http: http::HttpPolicy,
    /// libvirt access.
    pub libvirt: libvirt::LibvirtCap,
    /// Guest channel access.
    pub guest_channel: guest_channel::GuestChannelCap,
}

impl Policies {
    /// Builds the policies of plugin `name` from its effective grants.
    pub fn new(
        name: &str,
        effective: Effective,
        limits: &super::grants::Limits,
        router: Option<Arc<dyn guest_channel::GuestChannel>>,
    ) -> Policies {
        let name: Arc<str> = Arc::from(name);
        let effective = Arc::new(effective);
        Policies {
            config: Arc::new(effective.config.clone()),
            http: http::HttpPolicy::new(
                name.clone(),
                effective.http.clone(),
                effective.tls.clone(),
                limits.call_timeout(),
                limits.max_http_requests,
            ),
            libvirt: libvirt::LibvirtCap::new(
                name.clone(),
                effective.libvirt.clone(),
                limits.call_timeout(),
            ),
            guest_channel: guest_channel::GuestChannelCap::new(
                name,
                if effective.guest_channel {
                    router
                } else {
                    None
                },
            ),
            effective,
        }
    }
}
