//! The site's configuration file (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::placement::Policy;

/// What happens to a released VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleasePolicy {
    /// Stopped and kept as a free VM for the next matching request.
    #[default]
    Pool,
    /// Destroyed with its disks.
    Destroy,
}

/// Everything a site needs to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SiteConfig {
    /// Address to listen on (loopback by default).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the site database.
    pub data_dir: PathBuf,
    /// This site's id (told to its agents).
    #[serde(default = "default_id")]
    pub site_id: String,
    /// Token of the `admin` user, created (or updated) at start; at least 16 characters.
    pub admin_token: String,
    /// Lease of an allocation unless the request says, seconds.
    #[serde(default = "default_lease")]
    pub lease_default_seconds: u64,
    /// Longest lease a request or renewal may ask, seconds.
    #[serde(default = "default_lease_max")]
    pub lease_max_seconds: u64,
    /// What release does with a VM.
    #[serde(default)]
    pub release_policy: ReleasePolicy,
    /// How new VMs are placed.
    #[serde(default)]
    pub placement: Policy,
    /// How often agents are checked, milliseconds.
    #[serde(default = "default_health")]
    pub health_period_ms: u64,
    /// Users' jobs run at once, site-wide.
    #[serde(default = "default_parallel")]
    pub parallel_jobs: usize,
    /// Jobs of one user run at once (the rest wait their turn, round-robin
    /// between users).
    #[serde(default = "default_running_per_user")]
    pub max_running_jobs_per_user: usize,
    /// Jobs of one user waiting to run; more are refused `429` with `Retry-After`.
    #[serde(default = "default_queued_per_user")]
    pub max_queued_jobs_per_user: usize,
    /// System jobs (lease expiry, recovery) run at once, in their own lane.
    #[serde(default = "default_system_jobs")]
    pub system_jobs: usize,
    /// Longest time budget an exec or provision may ask (`timeout-ms`), seconds.
    #[serde(default = "default_exec_s")]
    pub max_exec_seconds: u64,
    /// Longest a copy into or out of a guest may run, seconds.
    #[serde(default = "default_copy_s")]
    pub max_copy_seconds: u64,
    /// How long a request (and a start) waits for the VM's guest agent to answer
    /// before it ends with the VM running but not `ready`, seconds; 0: not at all.
    #[serde(default = "default_ready_s")]
    pub ready_timeout_seconds: u64,
    /// How long finished jobs (and job events) are kept, seconds.
    #[serde(default = "default_retention_s")]
    pub job_retention_seconds: u64,
    /// How long a copy-out's file waits at the site to be fetched, seconds.
    #[serde(default = "default_output_retention_s")]
    pub copy_output_retention_seconds: u64,
    /// How long audit entries are kept, seconds.
    #[serde(default = "default_audit_retention_s")]
    pub audit_retention_seconds: u64,
    /// Job events kept at most (the oldest trimmed first, whatever their age).
    #[serde(default = "default_max_events")]
    pub max_job_events: u64,
    /// Finished jobs kept at most (those that ended first are removed first,
    /// each with its events, whatever their age); queued and running jobs never
    /// count.
    #[serde(default = "default_max_finished_jobs")]
    pub max_finished_jobs: u64,
    /// Memory the site's database cache holds resident once full, MiB, the
    /// allocator's share included (its pages beyond are read from the file again).
    #[serde(default = "default_cache_mib")]
    pub database_cache_mib: u64,
    /// Free space (MiB) under which, where the data lives, the site takes no new
    /// work (`507`); 0: no mark.
    #[serde(default = "default_min_free")]
    pub min_free_disk_mib: u64,
    /// Most stdout and stderr (each, KiB) an exec keeps in its job's result; more
    /// is cut and flagged truncated.
    #[serde(default = "default_output_kib")]
    pub max_output_kib: u32,
    /// Limits on HTTP clients (timeouts, connection caps).
    #[serde(default)]
    pub http: crate::api::server::HttpLimits,
    /// Largest file a copy in or out may stage, MiB.
    #[serde(default = "default_copy_mib")]
    pub max_copy_mib: u64,
    /// Most one user's copies may hold in staging at once (inputs waiting for
    /// their job, outputs waiting to be fetched), MiB; past it `403`.
    #[serde(default = "default_staging_user_mib")]
    pub max_staging_mib_per_user: u64,
    /// Most all copies may hold in staging at once, MiB; past it `507`.
    #[serde(default = "default_staging_mib")]
    pub max_staging_mib: u64,
    /// Serve HTTPS with this certificate (and, with `client-fingerprints`, only to
    /// clients presenting one of those certificates).
    #[serde(default)]
    pub tls: Option<crate::api::tls::TlsConfig>,
    /// How the site calls `https://` agents: a CA they chain to (else each agent's
    /// pinned fingerprint, given at registration) and the client certificate it
    /// presents to agents that require mutual TLS.
    #[serde(default)]
    pub agent_tls: crate::api::tls::ClientTls,
    /// The URL users reach the site at, as published (GLUE 2 endpoint URL); by
    /// default `http(s)://` and the listen address.
    #[serde(default)]
    pub public_url: Option<String>,
    /// GLUE 2 QualityLevel the site publishes: `production`, `pre-production`,
    /// `testing` or `development`.
    #[serde(default = "default_quality")]
    pub quality_level: String,
}

fn default_quality() -> String {
    "production".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7080))
}

fn default_id() -> String {
    "site".into()
}

fn default_lease() -> u64 {
    8 * 3600
}

fn default_lease_max() -> u64 {
    7 * 24 * 3600
}

fn default_health() -> u64 {
    5_000
}

fn default_copy_mib() -> u64 {
    16 * 1024
}

fn default_staging_user_mib() -> u64 {
    32 * 1024
}

fn default_staging_mib() -> u64 {
    128 * 1024
}

fn default_parallel() -> usize {
    64
}

fn default_running_per_user() -> usize {
    16
}

fn default_queued_per_user() -> usize {
    256
}

fn default_system_jobs() -> usize {
    16
}

fn default_exec_s() -> u64 {
    3600
}

fn default_copy_s() -> u64 {
    3600
}

fn default_ready_s() -> u64 {
    300
}

fn default_max_events() -> u64 {
    super::store::MAX_EVENTS
}

/// Finished jobs kept unless `max-finished-jobs` says (a few GB of database).
pub const DEFAULT_MAX_FINISHED_JOBS: u64 = 1_000_000;

fn default_max_finished_jobs() -> u64 {
    DEFAULT_MAX_FINISHED_JOBS
}

fn default_cache_mib() -> u64 {
    crate::store_core::DEFAULT_CACHE_MIB
}

fn default_retention_s() -> u64 {
    7 * 24 * 3600
}

fn default_output_retention_s() -> u64 {
    24 * 3600
}

fn default_audit_retention_s() -> u64 {
    365 * 24 * 3600
}

fn default_min_free() -> u64 {
    512
}

fn default_output_kib() -> u32 {
    1024
}

/// Why a site configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SiteConfigError {
    /// The file could not be read.
    #[error("cannot read site config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("site config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl SiteConfig {
    /// A configuration with defaults for everything but the data dir and token.
    pub fn new(data_dir: PathBuf, admin_token: String) -> SiteConfig {
        SiteConfig {
            listen: default_listen(),
            data_dir,
            site_id: default_id(),
            admin_token,
            lease_default_seconds: default_lease(),
            lease_max_seconds: default_lease_max(),
            release_policy: ReleasePolicy::default(),
            placement: Policy::default(),
            health_period_ms: default_health(),
            parallel_jobs: default_parallel(),
            max_running_jobs_per_user: default_running_per_user(),
            max_queued_jobs_per_user: default_queued_per_user(),
            system_jobs: default_system_jobs(),
            max_exec_seconds: default_exec_s(),
            max_copy_seconds: default_copy_s(),
            ready_timeout_seconds: default_ready_s(),
            job_retention_seconds: default_retention_s(),
            audit_retention_seconds: default_audit_retention_s(),
            database_cache_mib: default_cache_mib(),
            max_job_events: default_max_events(),
            max_finished_jobs: default_max_finished_jobs(),
            copy_output_retention_seconds: default_output_retention_s(),
            min_free_disk_mib: default_min_free(),
            max_output_kib: default_output_kib(),
            http: Default::default(),
            max_copy_mib: default_copy_mib(),
            max_staging_mib_per_user: default_staging_user_mib(),
            max_staging_mib: default_staging_mib(),
            tls: None,
            agent_tls: Default::default(),
            public_url: None,
            quality_level: default_quality(),
        }
    }

    /// The URL users reach the site at: `public-url`, else made from the listen
    /// address.
    pub fn url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!(
                "{}://{}",
                if self.tls.is_some() { "https" } else { "http" },
                self.listen
            ),
        }
    }

    /// Checks the values; says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.admin_token.len() < 16 {
            return Err("admin-token must be at least 16 characters".into());
        }
        if self.lease_default_seconds == 0 || self.lease_default_seconds > self.lease_max_seconds {
            return Err("lease-default-seconds must be between 1 and lease-max-seconds".into());
        }
        if self.health_period_ms < 100 {
            return Err("health-period-ms must be at least 100".into());
        }
        self.agent_tls
            .check_identity()
            .map_err(|e| format!("agent-tls (the site's client certificate): {e}"))?;
        if self.parallel_jobs == 0 || self.parallel_jobs > 4096 {
            return Err("parallel-jobs must be between 1 and 4096".into());
        }
        if self.max_running_jobs_per_user == 0 || self.max_running_jobs_per_user > 4096 {
            return Err("max-running-jobs-per-user must be between 1 and 4096".into());
        }
        if self.max_queued_jobs_per_user == 0 || self.max_queued_jobs_per_user > 1_000_000 {
            return Err("max-queued-jobs-per-user must be between 1 and 1000000".into());
        }
        if self.system_jobs == 0 || self.system_jobs > 4096 {
            return Err("system-jobs must be between 1 and 4096".into());
        }
        if self.max_exec_seconds == 0 || self.max_exec_seconds > 3600 {
            return Err("max-exec-seconds must be between 1 and 3600".into());
        }
        if self.max_copy_seconds == 0 || self.max_copy_seconds > 7 * 24 * 3600 {
            return Err("max-copy-seconds must be between 1 and 604800".into());
        }
        if self.job_retention_seconds == 0 || self.job_retention_seconds > 10 * 365 * 24 * 3600 {
            return Err("job-retention-seconds must be between 1 and ten years".into());
        }
        if self.copy_output_retention_seconds == 0
            || self.copy_output_retention_seconds > 365 * 24 * 3600
        {
            return Err("copy-output-retention-seconds must be between 1 and a year".into());
        }
        if !(1_000..=1_000_000_000_000).contains(&self.max_job_events) {
            return Err("max-job-events must be between 1000 and 10^12".into());
        }
        if !(1..=1_000_000_000_000).contains(&self.max_finished_jobs) {
            return Err("max-finished-jobs must be between 1 and 10^12".into());
        }
        if !(1..=crate::store_core::MAX_CACHE_MIB).contains(&self.database_cache_mib) {
            return Err(format!(
                "database-cache-mib must be between 1 and {}",
                crate::store_core::MAX_CACHE_MIB
            ));
        }
        if self.audit_retention_seconds == 0 || self.audit_retention_seconds > 100 * 365 * 24 * 3600
        {
            return Err("audit-retention-seconds must be between 1 and a hundred years".into());
        }
        if self.min_free_disk_mib > 1 << 40 {
            return Err("min-free-disk-mib must be at most 1099511627776".into());
        }
        if self.max_output_kib == 0 || self.max_output_kib > 16 * 1024 {
            return Err("max-output-kib must be between 1 and 16384".into());
        }
        if self.ready_timeout_seconds > 3600 {
            return Err("ready-timeout-seconds must be at most 3600".into());
        }
        if self.lease_max_seconds > 10 * 365 * 24 * 3600 {
            return Err("lease-max-seconds must be at most ten years".into());
        }
        if self.health_period_ms > 3_600_000 {
            return Err("health-period-ms must be at most one hour".into());
        }
        if self.max_copy_mib == 0 || self.max_copy_mib > 1 << 30 {
            return Err("max-copy-mib must be between 1 and 1073741824".into());
        }
        for (name, v) in [
            ("max-staging-mib-per-user", self.max_staging_mib_per_user),
            ("max-staging-mib", self.max_staging_mib),
        ] {
            if v == 0 || v > 1 << 30 {
                return Err(format!("{name} must be between 1 and 1073741824"));
            }
        }
        if !["production", "pre-production", "testing", "development"]
            .contains(&self.quality_level.as_str())
        {
            return Err(
                "quality-level must be production, pre-production, testing or development".into(),
            );
        }
        if let Some(u) = &self.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 2048 {
                return Err("public-url must be an http:// or https:// URL".into());
            }
        }
        self.http.validate()?;
        super::auth::validate_id("site-id", &self.site_id).map_err(|e| e.message)
    }

    /// Reads a config file; relative paths in it are taken relative to the file.
    pub fn read(path: &Path) -> Result<SiteConfig, SiteConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| SiteConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| SiteConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cfg: SiteConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.data_dir = base.join(&cfg.data_dir);
        if let Some(t) = &mut cfg.tls {
            t.cert = base.join(&t.cert);
            t.key = base.join(&t.key);
        }
        for p in [
            &mut cfg.agent_tls.ca,
            &mut cfg.agent_tls.cert,
            &mut cfg.agent_tls.key,
        ]
        .into_iter()
        .flatten()
        {
            *p = base.join(&*p);
        }
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::SiteConfig;

    /// `key` defaults to `default` (read by `get`), and each value is accepted
    /// or refused as `cases` says, a refusal naming the key.
    fn bounded(key: &str, get: impl Fn(&SiteConfig) -> u64, default: u64, cases: &[(&str, bool)]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        let base = "data-dir = \"data\"\nadmin-token = \"site-admin-0123456789\"\n";
        std::fs::write(&path, base).unwrap();
        assert_eq!(get(&SiteConfig::read(&path).unwrap()), default, "{key}");
        for (value, ok) in cases {
            std::fs::write(&path, format!("{base}{key} = {value}\n")).unwrap();
            let got = SiteConfig::read(&path);
            assert_eq!(got.is_ok(), *ok, "{key} = {value}: {:?}", got.err());
            if let Err(e) = got {
                assert!(e.to_string().contains(key), "{e}");
            }
        }
    }

    #[test]
    fn finished_jobs_kept_are_bounded_and_default_to_a_million() {
        bounded(
            "max-finished-jobs",
            |c| c.max_finished_jobs,
            1_000_000,
            &[
                ("1", true),
                ("1000000000000", true),
                ("0", false),
                ("1000000000001", false),
                ("18446744073709551615", false),
            ],
        );
    }

    #[test]
    fn the_agents_client_certificate_comes_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        let base = "data-dir = \"data\"\nadmin-token = \"site-admin-0123456789\"\n";
        for (tls, ok) in [
            ("cert = \"c.pem\"\nkey = \"c.key\"\n", true),
            ("cert = \"c.pem\"\n", false),
            ("key = \"c.key\"\n", false),
        ] {
            std::fs::write(&path, format!("{base}[agent-tls]\n{tls}")).unwrap();
            let got = SiteConfig::read(&path);
            assert_eq!(got.is_ok(), ok, "{tls}: {:?}", got.err());
            if let Err(e) = got {
                assert!(e.to_string().contains("agent-tls"), "{e}");
            }
        }
    }

    #[test]
    fn the_database_cache_is_bounded_and_defaults_to_256_mib() {
        bounded(
            "database-cache-mib",
            |c| c.database_cache_mib,
            256,
            &[("1", true), ("65536", true), ("0", false), ("65537", false)],
        );
    }
}
