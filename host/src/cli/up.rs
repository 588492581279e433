//! `gve up`: one process runs a site and a local agent with the kvm driver (and
//! guest-install), all state in one directory, and prints the admin token. It uses
//! the machine's libvirtd when one answers on `qemu:///system`, and otherwise starts
//! a private one (in its own mount namespace, state under the data directory), ended
//! with everything it started when `gve up` stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::{Agent, AgentConfig};
use crate::site::{Site, SiteConfig};

/// Arguments of `gve up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory for all state: databases, configs, images, private libvirtd.
    #[arg(long, default_value = "gve-data")]
    pub data: PathBuf,
    /// libvirt URI of the local QEMU/KVM hypervisor. Default: qemu:///system when a
    /// libvirtd answers there, else a private libvirtd started by gve up.
    #[arg(long, conflicts_with = "private_libvirtd")]
    pub libvirt: Option<String>,
    /// Always start a private libvirtd, even when the machine has one.
    #[arg(long)]
    pub private_libvirtd: bool,
    /// Directory holding the plugin bundles kvm and guest-install.
    #[arg(long, env = "GVE_PLUGINS", default_value = "target/plugins")]
    pub plugins: PathBuf,
    /// A guest directory (vmlinuz, initrd.img, base.qcow2, as scripts/harness/build-guest.sh
    /// makes) to offer as template "tiny".
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Site address.
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: SocketAddr,
    /// Agent address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub agent_listen: SocketAddr,
}

/// Secrets kept across runs of `gve up` on the same data directory.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Secrets {
    admin_token: String,
    agent_token: String,
}

/// Why `gve up` could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// A file or directory could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What it was for.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// libvirt refused something.
    #[error("libvirt {uri}: {message}")]
    Libvirt {
        /// URI.
        uri: String,
        /// What failed.
        message: String,
    },
    /// Something else, said in words.
    #[error("{0}")]
    Other(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UpError {
    let path = path.to_path_buf();
    move |source| UpError::Io { what, path, source }
}

/// Whether the system's libvirtd answers on qemu:///system; one that does not
/// answer in time is said so, and `gve up` starts a private one instead.
fn system_libvirtd_answers() -> bool {
    match super::libvirtd::open_within("qemu:///system", super::libvirtd::OPEN_WAIT) {
        Ok(_) => true,
        Err(e @ super::libvirtd::OpenError::NoAnswer(_)) => {
            eprintln!("gve up: qemu:///system: {e}");
            false
        }
        Err(super::libvirtd::OpenError::Failed(_)) => false,
    }
}

/// Makes sure pool `gve` (at `images`) is active and, given a guest, template `tiny`.
fn prepare_libvirt(uri: &str, images: &Path, template: Option<&Path>) -> Result<(), UpError> {
    use virt::domain::Domain;
    use virt::storage_pool::StoragePool;
    let lv = |e: virt::error::Error| UpError::Libvirt {
        uri: uri.to_string(),
        message: e.to_string(),
    };
    let conn = super::libvirtd::open_within(uri, super::libvirtd::OPEN_WAIT).map_err(|e| {
        UpError::Libvirt {
            uri: uri.to_string(),
            message: e.to_string(),
        }
    })?;
    let pool = match StoragePool::lookup_by_name(&conn, "gve") {
        Ok(p) => p,
        Err(_) => {
            let xml = format!(
                "<pool type='dir'><name>gve</name><target><path>{}</path></target></pool>",
                images.display()
            );
            StoragePool::define_xml(&conn, &xml, 0).map_err(lv)?
        }
    };
    if !pool.is_active().map_err(lv)? {
        pool.create(0).map_err(lv)?;
    }
    let _ = pool.set_autostart(true);
    if let Some(guest) = template {
        if Domain::lookup_by_name(&conn, "tiny").is_err() {
            let copy = |name: &str| -> Result<PathBuf, UpError> {
                let to = images.join(if name == "base.qcow2" {
                    "tiny-base.qcow2"
                } else {
                    name
                });
                std::fs::copy(guest.join(name), &to)
                    .map_err(io("template file", &guest.join(name)))?;
                Ok(to)
            };
            let (kernel, initrd, disk) =
                (copy("vmlinuz")?, copy("initrd.img")?, copy("base.qcow2")?);
            pool.refresh(0).map_err(lv)?;
            Domain::define_xml(
                &conn,
                &super::libvirtd::tiny_template_xml(&kernel, &initrd, &disk),
            )
            .map_err(lv)?;
        }
    }
    Ok(())
}

fn secrets(data: &Path) -> Result<Secrets, UpError> {
    let path = data.join("secrets.toml");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return toml::from_str(&text)
            .map_err(|e| UpError::Other(format!("{}: {e}", path.display())));
    }
    let s = Secrets {
        admin_token: crate::site::auth::new_token(),
        agent_token: crate::site::auth::new_token(),
    };
    let text = toml::to_string(&s).map_err(|e| UpError::Other(e.to_string()))?;
    crate::private_fs::write_private(&path, text.as_bytes()).map_err(io("secrets", &path))?;
    Ok(s)
}

fn agent_config(
    args: &UpArgs,
    data: &Path,
    uri: &str,
    token: &str,
    tls: &AgentTls,
) -> Result<AgentConfig, UpError> {
    let plugins = std::path::absolute(&args.plugins).map_err(io("plugins", &args.plugins))?;
    for p in ["kvm", "guest-install"] {
        if !plugins.join(p).join("gve-plugin.toml").is_file() {
            return Err(UpError::Other(format!(
                "no plugin bundle {} (run scripts/setup.sh, or pass --plugins)",
                plugins.join(p).display()
            )));
        }
    }
    let text = format!(
        "listen = \"{listen}\"\ndata-dir = \"agent\"\nadmin-token = \"{token}\"\nbundles-dir = \"bundles\"\n\
         [plugins.kvm]\nbundle = \"{kvm}\"\n[plugins.kvm.grants]\nlibvirt = [\"{uri}\"]\n\
         [plugins.kvm.grants.config]\nstorage-pool = \"gve\"\n[plugins.kvm.limits]\ncall-timeout-ms = 120000\n\
         [plugins.guest-install]\nbundle = \"{gi}\"\n[plugins.guest-install.grants]\nguest-channel = true\n\
         [plugins.guest-install.limits]\ncall-timeout-ms = 600000\n\
         [driver]\nplugin = \"kvm\"\nendpoint = \"{uri}\"\nguest-plugin = \"guest-install\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nclient-fingerprints = [\"{site}\"]\n",
        listen = args.agent_listen,
        cert = tls.cert.display(),
        key = tls.key.display(),
        site = tls.site_fingerprint,
        kvm = plugins.join("kvm").display(),
        gi = plugins.join("guest-install").display(),
    );
    let path = data.join("agent.toml");
    crate::private_fs::write_private(&path, text.as_bytes()).map_err(io("agent config", &path))?;
    std::fs::create_dir_all(data.join("bundles")).map_err(io("bundles", data))?;
    AgentConfig::read(&path).map_err(|e| UpError::Other(e.to_string()))
}

/// The agent's certificate, and the site's that it accepts as a client.
struct AgentTls {
    cert: PathBuf,
    key: PathBuf,
    site_fingerprint: String,
}

/// Runs `gve up` until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> i32 {
    match up(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn up(args: UpArgs) -> Result<(), UpError> {
    if crate::private_fs::private_dir(&args.data).map_err(io("data directory", &args.data))? {
        eprintln!(
            "gve up: {} was readable by other users; it is 0700 now",
            args.data.display()
        );
    }
    let data = std::path::absolute(&args.data).map_err(io("data directory", &args.data))?;
    let secrets = secrets(&data)?;
    let images = data.join("images");
    std::fs::create_dir_all(&images).map_err(io("images", &images))?;
    let (private, uri) = match &args.libvirt {
        Some(u) => (None, u.clone()),
        None if !args.private_libvirtd && system_libvirtd_answers() => {
            (None, "qemu:///system".to_string())
        }
        None => {
            eprintln!(
                "gve up: no libvirtd on qemu:///system; starting a private one under {}",
                data.join("libvirt").display()
            );
            let (lv, uri) = super::libvirtd::PrivateLibvirtd::start(&data.join("libvirt"))
                .map_err(UpError::Other)?;
            (Some(lv), uri)
        }
    };
    let template = args
        .template
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|e| UpError::Other(e.to_string()))?;
    {
        let (uri, images) = (uri.clone(), images.clone());
        tokio::task::spawn_blocking(move || prepare_libvirt(&uri, &images, template.as_deref()))
            .await
            .map_err(|e| UpError::Other(e.to_string()))??;
    }
    // TLS everywhere, with certificates made once: the CLI pins the site's, the
    // site pins the agent's, and the agent admits only the site's (mutual TLS).
    let names = ["localhost", "127.0.0.1", "::1"];
    let tls_dir = data.join("tls");
    let tls_err = |e: crate::api::tls::TlsError| UpError::Other(e.to_string());
    let (site_cert, site_key, site_fp) =
        crate::api::tls::self_signed(&tls_dir, "site", &names).map_err(tls_err)?;
    let (agent_cert, agent_key, agent_fp) =
        crate::api::tls::self_signed(&tls_dir, "agent", &names).map_err(tls_err)?;
    let agent_tls = AgentTls {
        cert: agent_cert,
        key: agent_key,
        site_fingerprint: site_fp.clone(),
    };
    let agent = Agent::start(agent_config(
        &args,
        &data,
        &uri,
        &secrets.agent_token,
        &agent_tls,
    )?)
    .await
    .map_err(|e| UpError::Other(format!("agent: {e}")))?;
    let mut site_config = SiteConfig::new(data.join("site"), secrets.admin_token.clone());
    site_config.listen = args.listen;
    site_config.tls = Some(crate::api::tls::TlsConfig {
        cert: site_cert.clone(),
        key: site_key.clone(),
        client_fingerprints: Vec::new(),
    });
    site_config.agent_tls = crate::api::tls::ClientTls {
        cert: Some(site_cert),
        key: Some(site_key),
        ..Default::default()
    };
    let site = Site::start(site_config)
        .await
        .map_err(|e| UpError::Other(format!("site: {e}")))?;
    let agent_url = format!("https://{}", agent.addr);
    let known = site
        .core
        .store
        .agent("local")
        .map_err(|e| UpError::Other(e.to_string()))?;
    match known {
        Some(a) if a.url == agent_url && a.fingerprint.as_deref() == Some(agent_fp.as_str()) => {
            site.core.agents.check("local").await
        }
        other => {
            // Its own agent, whatever site it served before (this data directory's
            // site database made anew).
            crate::agent::site_claim::release(agent.runtime.registry(), None)
                .map_err(|e| UpError::Other(e.to_string()))?;
            if other.is_some() {
                site.core
                    .agents
                    .unregister("local", true)
                    .map_err(|e| UpError::Other(e.message))?
                    .told()
                    .await;
            }
            site.core
                .agents
                .register("local", &agent_url, &secrets.agent_token, Some(&agent_fp))
                .await
                .map_err(|e| {
                    UpError::Other(format!("registering the local agent: {}", e.message))
                })?;
        }
    }
    local_agent_ready(&site, args.template.is_some()).await;
    println!(
        "gve up: site https://{} (agent {agent_url}, libvirt {uri})",
        site.addr
    );
    println!("admin token: {}", secrets.admin_token);
    println!("site fingerprint: {site_fp}");
    println!(
        "  export GVE_URL=https://{} GVE_TOKEN={} GVE_FINGERPRINT={site_fp}",
        site.addr, secrets.admin_token
    );
    println!("  gve vm templates; gve vm request --template tiny --memory-mib 256 --wait");
    site.run_until_signal().await;
    agent.stop().await;
    drop(private);
    Ok(())
}

/// How long `gve up` waits for the site to know its local agent before it says
/// where the site is anyway.
const AGENT_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Checks the local agent again, every second, until the site has it up (and
/// offering a template when one was given): a first check on a busy machine
/// can fail or find the agent's first reconcile pass not done, and the site's
/// own checks would only come back to it seconds after `gve up` said it was
/// ready. Says so on stderr if it does not come within [`AGENT_READY_WITHIN`].
async fn local_agent_ready(site: &Site, want_template: bool) {
    let ready = || {
        matches!(
            site.core.store.agent("local"),
            Ok(Some(a)) if a.status == crate::site::model::AgentStatus::Up
                && (!want_template || !a.templates.is_empty())
        )
    };
    let end = std::time::Instant::now() + AGENT_READY_WITHIN;
    while !ready() {
        if std::time::Instant::now() >= end {
            let why = match site.core.store.agent("local") {
                Ok(Some(a)) => a.error.unwrap_or_else(|| "no template offered".into()),
                Ok(None) => "not registered".into(),
                Err(e) => e.to_string(),
            };
            eprintln!(
                "gve up: the local agent is not up (or offers no template) after {} s ({why}); the site keeps checking it (`gve agent list`)",
                AGENT_READY_WITHIN.as_secs()
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        site.core.agents.check("local").await;
    }
}
