//! The agent's configuration file (TOML).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plugin::PluginSpec;

/// Everything an agent needs to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// Address to listen on (loopback by default).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the agent's database and artifact cache.
    pub data_dir: PathBuf,
    /// Bearer token of the agent's administrator (plugin management).
    pub admin_token: String,
    /// Bearer token that reads `GET /metrics` and nothing else (a scraper's
    /// credential; the admin token reads it too).
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// Plugins to load at start, by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSpec>,
    /// The hypervisor this agent manages, through which driver plugin.
    #[serde(default)]
    pub driver: Option<DriverConfig>,
    /// Directory of software bundles for `provision`: one sub-directory per bundle,
    /// each with an `install.sh`.
    #[serde(default)]
    pub bundles_dir: Option<PathBuf>,
    /// Limits on HTTP clients (timeouts, connection caps).
    #[serde(default)]
    pub http: crate::api::server::HttpLimits,
    /// The most the admin API may load and grant (default: what this file gives).
    #[serde(default)]
    pub plugin_policy: Option<super::policy::PluginPolicy>,
    /// Serve HTTPS with this certificate; with `client-fingerprints`, only to the
    /// site (or operator) presenting one of those certificates (mutual TLS).
    #[serde(default)]
    pub tls: Option<crate::api::tls::TlsConfig>,
    /// How long finished operations (and the idempotency keys that started them)
    /// are kept, seconds. A site retrying a job after longer than this would start
    /// its operation again.
    #[serde(default = "default_op_retention_s")]
    pub operation_retention_seconds: u64,
    /// How long audit entries are kept, seconds.
    #[serde(default = "default_audit_retention_s")]
    pub audit_retention_seconds: u64,
    /// Memory the registry's database cache holds resident once full, MiB, the
    /// allocator's share included (its pages beyond are read from the file again).
    #[serde(default = "default_cache_mib")]
    pub database_cache_mib: u64,
}

fn default_cache_mib() -> u64 {
    crate::store_core::DEFAULT_CACHE_MIB
}

fn default_audit_retention_s() -> u64 {
    365 * 24 * 3600
}

fn default_op_retention_s() -> u64 {
    7 * 24 * 3600
}

impl Default for AgentConfig {
    /// Defaults for everything; `data-dir` and `admin-token` must still be set.
    fn default() -> AgentConfig {
        AgentConfig {
            listen: default_listen(),
            data_dir: PathBuf::new(),
            admin_token: String::new(),
            metrics_token: None,
            plugins: BTreeMap::new(),
            driver: None,
            bundles_dir: None,
            http: Default::default(),
            plugin_policy: None,
            tls: None,
            operation_retention_seconds: default_op_retention_s(),
            audit_retention_seconds: default_audit_retention_s(),
            database_cache_mib: default_cache_mib(),
        }
    }
}

/// The driver session the agent's VM API runs on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DriverConfig {
    /// Name of a plugin from `plugins`.
    pub plugin: String,
    /// Endpoint (libvirt URI, vSphere URL, `memory:NAME`, ...).
    pub endpoint: String,
    /// User name for the endpoint.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the endpoint.
    #[serde(default)]
    pub password: Option<String>,
    /// Token for the endpoint.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the password, instead of `password` in this file: read
    /// each time the driver starts and never recorded; a regular file of the
    /// agent's own user that no one else may read (a systemd credential, for
    /// one). One trailing newline is dropped. Config file only: `PUT
    /// /v1/driver` refuses it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A file holding the token, instead of `token` (as `password-file`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Plugin (from `plugins`) that runs exec and copy in guests when the driver
    /// has no native guest operations, e.g. `guest-install`. It needs the
    /// `guest-channel` grant.
    #[serde(default)]
    pub guest_plugin: Option<String>,
    /// Where other hosts send VMs migrating to this one, when not the endpoint
    /// itself (libvirt refuses a local `qemu:///system?socket=` URI as a
    /// destination; `qemu+unix:///system?socket=...` or `qemu+tcp://host/system` work).
    #[serde(default)]
    pub migration_uri: Option<String>,
    /// How often the registry is reconciled with the hypervisor, milliseconds.
    #[serde(default = "default_reconcile_ms")]
    pub reconcile_period_ms: u64,
    /// How long a reservation holds a VM unless the request says, seconds.
    #[serde(default = "default_reservation_s")]
    pub reservation_seconds: u64,
}

fn default_reconcile_ms() -> u64 {
    5_000
}

fn default_reservation_s() -> u64 {
    300
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read agent config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("agent config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl AgentConfig {
    /// Reads a config file; relative paths in it are taken relative to the file.
    pub fn read(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cfg: AgentConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        // Relative to the file, also when the file itself was named relative to
        // the working directory (`-c agent.toml`): what is read later, such as a
        // plugin's secret files, must not depend on where the agent runs from.
        let absolute = std::path::absolute(path).map_err(|e| invalid(e.to_string()))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        cfg.data_dir = base.join(&cfg.data_dir);
        cfg.bundles_dir = cfg.bundles_dir.map(|d| base.join(d));
        if let Some(t) = &mut cfg.tls {
            t.cert = base.join(&t.cert);
            t.key = base.join(&t.key);
        }
        if let Some(p) = &mut cfg.plugin_policy {
            for d in &mut p.bundle_dirs {
                *d = base.join(&*d);
            }
        }
        for (name, spec) in &mut cfg.plugins {
            spec.bundle = base.join(&spec.bundle);
            for path in spec.grants.config_files.values_mut() {
                *path = base.join(&*path);
            }
            for t in spec.grants.tls.values_mut() {
                for path in [&mut t.ca, &mut t.cert, &mut t.key].into_iter().flatten() {
                    *path = base.join(&*path);
                }
            }
            crate::plugin::manifest::validate_name(name)
                .map_err(|m| invalid(format!("plugins.{name}: {m}")))?;
        }
        if cfg.operation_retention_seconds == 0
            || cfg.operation_retention_seconds > 10 * 365 * 24 * 3600
        {
            return Err(invalid(
                "operation-retention-seconds must be between 1 and ten years".into(),
            ));
        }
        if !(1..=crate::store_core::MAX_CACHE_MIB).contains(&cfg.database_cache_mib) {
            return Err(invalid(format!(
                "database-cache-mib must be between 1 and {}",
                crate::store_core::MAX_CACHE_MIB
            )));
        }
        if cfg.audit_retention_seconds == 0 || cfg.audit_retention_seconds > 100 * 365 * 24 * 3600 {
            return Err(invalid(
                "audit-retention-seconds must be between 1 and a hundred years".into(),
            ));
        }
        if let Some(d) = &mut cfg.driver {
            d.password_file = d.password_file.as_ref().map(|f| base.join(f));
            d.token_file = d.token_file.as_ref().map(|f| base.join(f));
            d.secrets().map_err(|m| invalid(format!("driver.{m}")))?;
        }
        if let Some(d) = &cfg.driver {
            if !cfg.plugins.contains_key(&d.plugin) {
                return Err(invalid(format!(
                    "driver.plugin '{}' is not among [plugins]",
                    d.plugin
                )));
            }
            if let Some(g) = &d.guest_plugin {
                match cfg.plugins.get(g) {
                    None => {
                        return Err(invalid(format!(
                            "driver.guest-plugin '{g}' is not among [plugins]"
                        )))
                    }
                    Some(spec) if !spec.grants.guest_channel => {
                        return Err(invalid(format!(
                        "driver.guest-plugin '{g}' needs [plugins.{g}.grants] guest-channel = true"
                    )))
                    }
                    Some(_) => {}
                }
            }
            if d.reconcile_period_ms < 100 {
                return Err(invalid(
                    "driver.reconcile-period-ms must be at least 100".into(),
                ));
            }
        }
        if cfg.admin_token.len() < 16 {
            return Err(invalid("admin-token must be at least 16 characters".into()));
        }
        match &cfg.metrics_token {
            Some(m) if m.len() < 16 => {
                return Err(invalid(
                    "metrics-token must be at least 16 characters".into(),
                ))
            }
            Some(m) if *m == cfg.admin_token => {
                return Err(invalid(
                    "metrics-token must differ from admin-token (it reads /metrics only)".into(),
                ))
            }
            _ => {}
        }
        cfg.http.validate().map_err(invalid)?;
        Ok(cfg)
    }
}

impl DriverConfig {
    /// The password and token the driver opens its endpoint with: each given
    /// inline or read from its file now. An error names the field and says
    /// what is wrong, never the secret.
    pub fn secrets(&self) -> Result<(Option<String>, Option<String>), String> {
        Ok((
            secret("password", &self.password, &self.password_file)?,
            secret("token", &self.token, &self.token_file)?,
        ))
    }
}

/// Field `field`'s secret: `inline`, or the contents of `file` (its owner's
/// only, one trailing newline dropped; [`crate::private_fs::read_secret`]), not both.
fn secret(
    field: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("{field} and {field}-file are both set: give one")),
        (inline, None) => Ok(inline.clone()),
        (None, Some(path)) => {
            crate::private_fs::read_secret(&format!("{field}-file"), path).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AgentConfig;

    #[test]
    fn the_database_cache_is_bounded_and_defaults_to_256_mib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let base = "data-dir = \"data\"\nadmin-token = \"agent-admin-0123456789\"\n";
        std::fs::write(&path, base).unwrap();
        assert_eq!(AgentConfig::read(&path).unwrap().database_cache_mib, 256);
        for (value, ok) in [("1", true), ("65536", true), ("0", false), ("65537", false)] {
            std::fs::write(&path, format!("{base}database-cache-mib = {value}\n")).unwrap();
            let got = AgentConfig::read(&path);
            assert_eq!(
                got.is_ok(),
                ok,
                "{value}: {:?}",
                got.err().map(|e| e.to_string())
            );
            if let Err(e) = got {
                assert!(e.to_string().contains("database-cache-mib"), "{e}");
            }
        }
    }

    #[test]
    fn a_metrics_token_is_long_and_not_the_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let base = "data-dir = \"data\"\nadmin-token = \"agent-admin-0123456789\"\n";
        for (value, ok) in [
            ("scrape-0123456789", true),
            ("short", false),
            ("agent-admin-0123456789", false),
        ] {
            std::fs::write(&path, format!("{base}metrics-token = \"{value}\"\n")).unwrap();
            match AgentConfig::read(&path) {
                Ok(cfg) => {
                    assert!(ok, "{value} was taken");
                    assert_eq!(cfg.metrics_token.as_deref(), Some(value));
                }
                Err(e) => {
                    assert!(!ok, "{value}: {e}");
                    assert!(e.to_string().contains("metrics-token"), "{e}");
                    assert!(!e.to_string().contains(value), "the secret leaked: {e}");
                }
            }
        }
    }

    #[test]
    fn paths_are_absolute_also_from_a_config_named_relative_to_the_working_directory() {
        // A directory under the working directory, named relative to it (`-c
        // dir/agent.toml`); no chdir, which would race the other tests.
        let cwd = std::env::current_dir().unwrap();
        let dir = tempfile::tempdir_in(&cwd).unwrap();
        let rel = dir.path().strip_prefix(&cwd).unwrap().join("agent.toml");
        std::fs::write(
            &rel,
            "data-dir = \"data\"\nadmin-token = \"agent-admin-0123456789\"\n\
             [plugins.memory]\nbundle = \"memory\"\n\
             grants = { http = [\"vc:443\"], config-files = { pw = \"pw\" }, \
             tls = { \"vc:443\" = { ca = \"ca.pem\" } } }\n",
        )
        .unwrap();
        let cfg = AgentConfig::read(&rel).unwrap();
        let spec = &cfg.plugins["memory"];
        assert_eq!(spec.grants.config_files["pw"], dir.path().join("pw"));
        assert_eq!(
            spec.grants.tls["vc:443"].ca,
            Some(dir.path().join("ca.pem"))
        );
        assert_eq!(spec.bundle, dir.path().join("memory"));
        assert_eq!(cfg.data_dir, dir.path().join("data"));
        // What the plugin's load checks: both files absolute.
        assert_eq!(spec.grants.validate(), Ok(()));
    }
}

#[cfg(test)]
mod secret_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::AgentConfig;

    const BASE: &str = "data-dir = \"data\"\nadmin-token = \"agent-admin-0123456789\"\n\
        [plugins.memory]\nbundle = \"memory\"\n[driver]\nplugin = \"memory\"\nendpoint = \"memory:x\"\n";

    fn read(dir: &std::path::Path, driver: &str) -> Result<AgentConfig, String> {
        let path = dir.join("agent.toml");
        std::fs::write(&path, format!("{BASE}{driver}")).unwrap();
        AgentConfig::read(&path).map_err(|e| e.to_string())
    }

    #[test]
    fn a_password_file_is_read_relative_to_the_config_and_only_if_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vsphere.pw");
        std::fs::write(&file, "s3cret-pw\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = read(dir.path(), "password-file = \"vsphere.pw\"\n").unwrap();
        let d = cfg.driver.unwrap();
        assert_eq!(d.password_file.as_deref(), Some(file.as_path()));
        assert_eq!(d.secrets().unwrap(), (Some("s3cret-pw".into()), None));

        // Open to the group: refused, naming the file and the mode, not the secret.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read(dir.path(), "password-file = \"vsphere.pw\"\n").unwrap_err();
        assert!(
            e.contains("driver.password-file") && e.contains("640"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read(dir.path(), "password-file = \"vsphere.pw\"\n").is_ok());

        // Both, a missing file, an empty one, a directory: each refused with its reason.
        let both = read(
            dir.path(),
            "password = \"x\"\npassword-file = \"vsphere.pw\"\n",
        );
        assert!(both.unwrap_err().contains("both set"));
        let missing = read(dir.path(), "token-file = \"nope\"\n").unwrap_err();
        assert!(
            missing.contains("token-file") && missing.contains("nope"),
            "{missing}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\r\n").unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(dir.path(), "token-file = \"empty\"\n")
            .unwrap_err()
            .contains("is empty"));
        // A FIFO is refused at once, not waited on; a file past the cap too.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read(dir.path(), "token-file = \"fifo\"\n")
            .unwrap_err()
            .contains("not a file"));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(dir.path(), "token-file = \"big\"\n")
            .unwrap_err()
            .contains("larger than"));
        // Another user's file, however private, is not the agent's secret.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            let e = read(dir.path(), "password-file = \"vsphere.pw\"\n").unwrap_err();
            assert!(e.contains("belongs to user 65534"), "{e}");
        }
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(read(dir.path(), "token-file = \"sub\"\n")
            .unwrap_err()
            .contains("not a file"));
    }
}
