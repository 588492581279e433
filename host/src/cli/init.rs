//! `gve site init` and `gve agent init`: a working configuration with fresh
//! secrets, written 0600 (certificates and keys beside it in a 0700 `tls/`), read
//! back with the service's own parser before anything is reported. The systemd
//! units in `dist/systemd/` run what these write.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::CliError;

/// What both `init`s take.
#[derive(Debug, clap::Args)]
pub struct InitCommon {
    /// Where to write the config (e.g. /etc/gve/site.toml, /etc/gve/agent.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// The data directory (default: `site-data` or `agent-data` beside the config).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// DNS names and addresses for its certificate (repeatable; default: this
    /// host's name, localhost, 127.0.0.1, ::1).
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Serve plain HTTP (behind a TLS-terminating proxy, or on loopback only).
    #[arg(long)]
    pub no_tls: bool,
    /// Replace an existing config (its secrets change).
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `gve site init`.
#[derive(Debug, clap::Args)]
pub struct SiteInitArgs {
    /// Config path, data directory, certificate, overwrite.
    #[command(flatten)]
    pub common: InitCommon,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: SocketAddr,
    /// The site's id (told to its agents, published in GLUE 2).
    #[arg(long, default_value = "site")]
    pub site_id: String,
    /// The URL users reach the site at (published in GLUE 2).
    #[arg(long)]
    pub public_url: Option<String>,
}

/// Arguments of `gve agent init`.
#[derive(Debug, clap::Args)]
pub struct AgentInitArgs {
    /// Config path, data directory, certificate, overwrite.
    #[command(flatten)]
    pub common: InitCommon,
    /// Address to listen on (the site must reach it).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Driver plugin: kvm, xen, vmware-esx, or any bundle under --plugins.
    #[arg(long, default_value = "kvm")]
    pub driver: String,
    /// The hypervisor endpoint (default: qemu:///system for kvm, xen:///system for
    /// xen; vmware-esx needs its SDK URL).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Directory of plugin bundles (each a folder with gve-plugin.toml).
    #[arg(long)]
    pub plugins: PathBuf,
    /// Storage pool the libvirt drivers keep disks in.
    #[arg(long, default_value = "gve")]
    pub storage_pool: String,
    /// Mutual TLS: admit only the site presenting this certificate (its SHA-256
    /// fingerprint, as `gve site init` prints it).
    #[arg(long)]
    pub site_fingerprint: Option<String>,
}

/// A TOML string literal.
fn lit(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

/// This host's name, when it has one.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The certificate names: those given, else the host's name and loopback.
fn cert_names(given: &[String]) -> Vec<String> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let mut names: Vec<String> = hostname().into_iter().collect();
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    names
}

/// The directory of `config` (made 0700 when missing), refusing to replace an
/// existing file without `force`.
fn prepare(config: &Path, force: bool) -> Result<PathBuf, CliError> {
    if config.exists() && !force {
        return Err(CliError::Usage(format!(
            "{} exists; --force replaces it (and its secrets)",
            config.display()
        )));
    }
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    if !dir.is_dir() {
        crate::private_fs::private_dir(&dir).map_err(|e| CliError::file(&dir, e))?;
    }
    Ok(dir)
}

/// A fresh self-signed certificate beside the config, named after it
/// (`tls/<config stem>.pem` and `.key`, so two configs in one directory keep
/// their own), replacing one of that name; returns the paths as the config
/// should name them (relative to its directory) and the fingerprint.
fn certificate(
    dir: &Path,
    config: &Path,
    names: &[String],
) -> Result<(String, String, String), CliError> {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gve".into());
    let tls = dir.join("tls");
    for old in [format!("{stem}.pem"), format!("{stem}.key")] {
        let _ = std::fs::remove_file(tls.join(old));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_, _, fp) = crate::api::tls::self_signed(&tls, &stem, &names)
        .map_err(|e| CliError::Usage(format!("certificate: {e}")))?;
    Ok((format!("tls/{stem}.pem"), format!("tls/{stem}.key"), fp))
}

/// Writes `text` as `config` (0600) once `check` has read it back: it is checked
/// under a temporary name beside it, so a config that would not load never
/// replaces one.
fn write_checked(
    config: &Path,
    text: &str,
    check: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), CliError> {
    let name = config
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trial = config.with_file_name(format!(".{name}.new"));
    crate::private_fs::write_private(&trial, text.as_bytes())
        .map_err(|e| CliError::file(&trial, e))?;
    if let Err(e) = check(&trial) {
        let _ = std::fs::remove_file(&trial);
        return Err(CliError::Usage(format!("the config would not load: {e}")));
    }
    std::fs::rename(&trial, config).map_err(|e| CliError::file(config, e))
}

/// How others reach a service listening on `listen`: a wildcard address is
/// replaced by the first certificate name (else this host's name).
fn reachable(listen: SocketAddr, names: &[String]) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = names
        .first()
        .cloned()
        .or_else(hostname)
        .unwrap_or_else(|| "localhost".into());
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]:{}", listen.port()),
        Err(_) => format!("{host}:{}", listen.port()),
    }
}

/// `gve site init`.
pub fn site(a: SiteInitArgs) -> Result<i32, CliError> {
    crate::site::auth::validate_id("site-id", &a.site_id)
        .map_err(|e| CliError::Usage(e.message))?;
    let dir = prepare(&a.common.config, a.common.force)?;
    let token = crate::site::auth::new_token();
    let data = a
        .common
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("site-data"));
    let mut text = format!(
        "# gve site: written by `gve site init`; keep it 0600 (it holds the admin token).\n\
         # Settings not written here keep their defaults (host/src/site/config.rs).\n\
         listen = {}\ndata-dir = {}\nsite-id = {}\nadmin-token = {}\n",
        lit(a.listen.to_string()),
        lit(data.to_string_lossy()),
        lit(&a.site_id),
        lit(&token),
    );
    let scheme = if a.common.no_tls { "http" } else { "https" };
    let names = cert_names(&a.common.names);
    // Listening on every address: publish a name others can reach it by.
    let public_url = a
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", reachable(a.listen, &names)));
    if a.public_url.is_some() || a.listen.ip().is_unspecified() {
        text.push_str(&format!("public-url = {}\n", lit(&public_url)));
    }
    let mut fingerprint = None;
    if !a.common.no_tls {
        let (cert, key, fp) = certificate(&dir, &a.common.config, &names)?;
        // The same certificate is the client certificate agents with mutual TLS admit.
        text.push_str(&format!(
            "\n[tls]\ncert = {c}\nkey = {k}\n\n[agent-tls]\ncert = {c}\nkey = {k}\n",
            c = lit(cert),
            k = lit(key),
        ));
        fingerprint = Some(fp);
    }
    write_checked(&a.common.config, &text, |p| {
        crate::site::SiteConfig::read(p)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    println!("wrote {}", a.common.config.display());
    println!("admin token: {token}");
    if let Some(fp) = &fingerprint {
        println!("site fingerprint: {fp}");
    }
    println!(
        "run: gve site run --config {}   (or the gve-site systemd unit)",
        a.common.config.display()
    );
    println!(
        "then: gve site add {} --url {public_url}{} --token <the admin token>",
        a.site_id,
        fingerprint
            .map(|f| format!(" --fingerprint {f}"))
            .unwrap_or_default()
    );
    Ok(0)
}

/// `gve agent init`.
pub fn agent(a: AgentInitArgs) -> Result<i32, CliError> {
    if a.common.no_tls && a.site_fingerprint.is_some() {
        return Err(CliError::Usage(
            "--site-fingerprint needs TLS: mutual TLS is what admits only the site; drop --no-tls"
                .into(),
        ));
    }
    let plugins = std::path::absolute(&a.plugins).map_err(|e| CliError::file(&a.plugins, e))?;
    let bundle = |name: &str| {
        let b = plugins.join(name);
        if b.join("gve-plugin.toml").is_file() {
            Ok(b)
        } else {
            Err(CliError::Usage(format!(
                "no plugin bundle {} (build the plugins, or pass --plugins)",
                b.display()
            )))
        }
    };
    let driver = bundle(&a.driver)?;
    let endpoint = match (&a.endpoint, a.driver.as_str()) {
        (Some(e), _) => e.clone(),
        (None, "kvm") => "qemu:///system".into(),
        (None, "xen") => "xen:///system".into(),
        (None, other) => {
            return Err(CliError::Usage(format!(
                "--endpoint: the {other} driver needs the hypervisor's endpoint"
            )))
        }
    };
    let libvirt = matches!(a.driver.as_str(), "kvm" | "xen");
    let dir = prepare(&a.common.config, a.common.force)?;
    let token = crate::site::auth::new_token();
    let data = a
        .common
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("agent-data"));
    // A bare TOML key when the name allows one (plugin names are kebab-case).
    let p = if a
        .driver
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        a.driver.clone()
    } else {
        lit(&a.driver)
    };
    let mut text = format!(
        "# gve agent: written by `gve agent init`; keep it 0600 (it holds the agent's\n\
         # admin token, which the site is given with `gve agent add`).\n\
         listen = {}\ndata-dir = {}\nadmin-token = {}\n\n\
         [plugins.{p}]\nbundle = {}\n[plugins.{p}.limits]\ncall-timeout-ms = 120000\n",
        lit(a.listen.to_string()),
        lit(data.to_string_lossy()),
        lit(&token),
        lit(driver.to_string_lossy()),
    );
    if libvirt {
        text.push_str(&format!(
            "[plugins.{p}.grants]\nlibvirt = [{}]\n[plugins.{p}.grants.config]\nstorage-pool = {}\n",
            lit(&endpoint),
            lit(&a.storage_pool)
        ));
    }
    // The QEMU guest agent protocol carries exec and copy for the libvirt drivers.
    let guest = libvirt.then(|| bundle("guest-install").ok()).flatten();
    if let Some(gi) = &guest {
        text.push_str(&format!(
            "\n[plugins.guest-install]\nbundle = {}\n[plugins.guest-install.grants]\n\
             guest-channel = true\n[plugins.guest-install.limits]\ncall-timeout-ms = 600000\n",
            lit(gi.to_string_lossy())
        ));
    }
    text.push_str(&format!(
        "\n[driver]\nplugin = {}\nendpoint = {}\n",
        lit(&a.driver),
        lit(&endpoint)
    ));
    if guest.is_some() {
        text.push_str("guest-plugin = \"guest-install\"\n");
    }
    let names = cert_names(&a.common.names);
    let mut fingerprint = None;
    if !a.common.no_tls {
        let (cert, key, fp) = certificate(&dir, &a.common.config, &names)?;
        text.push_str(&format!(
            "\n[tls]\ncert = {}\nkey = {}\n",
            lit(cert),
            lit(key)
        ));
        if let Some(site) = &a.site_fingerprint {
            let site = crate::api::tls::normalize_fingerprint(site)
                .map_err(|e| CliError::Usage(format!("--site-fingerprint: {e}")))?;
            text.push_str(&format!("client-fingerprints = [{}]\n", lit(site)));
        }
        fingerprint = Some(fp);
    }
    write_checked(&a.common.config, &text, |p| {
        crate::agent::AgentConfig::read(p)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    if !a.common.no_tls && a.site_fingerprint.is_none() {
        eprintln!(
            "warning: no --site-fingerprint: any client with the admin token is admitted \
             (mutual TLS admits only the site)"
        );
    }
    let scheme = if a.common.no_tls { "http" } else { "https" };
    println!("wrote {}", a.common.config.display());
    println!("agent secret: {token}");
    if let Some(fp) = &fingerprint {
        println!("agent fingerprint: {fp}");
    }
    println!(
        "run: gve agent run --config {}   (or the gve-agent systemd unit)",
        a.common.config.display()
    );
    println!(
        "then, as the site's admin: gve agent add ID {scheme}://{} --secret <the agent secret>{}",
        reachable(a.listen, &names),
        fingerprint
            .map(|f| format!(" --agent-fingerprint {f}"))
            .unwrap_or_default()
    );
    Ok(0)
}
