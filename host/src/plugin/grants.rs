//! The operator's grants and limits for one plugin: what it may reach and how much it
//! may use. Grants are the only source of authority; a manifest request without a
//! grant gets nothing, and a grant the manifest did not request is not given.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::manifest::Requests;

/// A directory lent to a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirGrant {
    /// Absolute directory on the host.
    pub host: PathBuf,
    /// Path the plugin sees it at (e.g. `/images`).
    pub guest: String,
    /// Read-only unless set.
    #[serde(default)]
    pub writable: bool,
}

/// What the operator grants a plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    /// Outgoing HTTP authorities, `host:port` (the port is required).
    pub http: Vec<String>,
    /// libvirt URIs the plugin may open or migrate to (exact match).
    pub libvirt: Vec<String>,
    /// Whether the plugin may reach VMs' in-guest agents.
    pub guest_channel: bool,
    /// Directories preopened for the plugin.
    pub directories: Vec<DirGrant>,
    /// The plugin's own configuration values.
    pub config: BTreeMap<String, String>,
    /// Configuration values read from files at each load (key → absolute path;
    /// [`crate::private_fs::read_secret`]): a secret such as a guest password
    /// kept out of the agent's config file and out of everything the agent
    /// records. Set in the agent's config file only: the admin API refuses them,
    /// since the agent would read the file named and lend what it holds.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub config_files: BTreeMap<String, PathBuf>,
    /// How the host verifies the TLS server at a granted HTTP authority
    /// (`host:port`): a pinned SHA-256 `fingerprint` of its certificate, or a `ca`
    /// (PEM) it must chain to. Authorities without an entry are verified against
    /// the public web roots.
    pub tls: BTreeMap<String, crate::tls::ClientTls>,
}

/// Resource limits applied to each instance of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Linear memory cap per instance, MiB.
    pub memory_mib: u64,
    /// Wall-clock budget of one contract call, milliseconds.
    pub call_timeout_ms: u64,
    /// What one create, clone or migration may wait, milliseconds, beyond its
    /// budget for host calls long by nature (a libvirt migration, managed save, snapshot, volume
    /// clone or pool refresh), all of them together; 0: none. Left out of what is
    /// written when it is the default, so that an agent older than it still takes
    /// a spec this release's CLI sends.
    #[serde(skip_serializing_if = "is_default_long")]
    pub long_call_timeout_ms: u64,
    /// Most instances of this plugin alive at once (across all sessions).
    pub max_instances: u32,
    /// Instances kept warm for calls, each with its sessions open; calls beyond it
    /// wait. The manifest's `concurrency` lowers it further. A driver's calls into
    /// guests (guest-agent commands) have half as many again of their own, and its
    /// creates, clones and migrations as many again (all within `max-instances`).
    pub pool_size: u32,
    /// Host resources (handles of every kind) one instance may hold at once.
    pub max_host_resources: u32,
    /// Files and directory listings one instance may hold open at once.
    pub max_open_files: u32,
    /// Outgoing HTTP requests one instance may have in flight at once.
    pub max_http_requests: u32,
    /// HTTP header sets (`fields`, requests being built) one instance may hold at
    /// once; each holds at most 64 KiB.
    pub max_http_header_sets: u32,
    /// libvirt connections one instance may hold open at once.
    pub max_libvirt_connections: u32,
    /// Log bytes one call may write; later lines are dropped and counted.
    pub log_kib_per_call: u32,
    /// What ending a guest command takes the plugin, ms, when the operator knows
    /// better than its manifest's `exec-margin-ms` (a slow vCenter); a value below
    /// the manifest's is not used. The agent allows guest commands the call budget
    /// less the margin in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_margin_ms: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 64,
            call_timeout_ms: 30_000,
            long_call_timeout_ms: DEFAULT_LONG_CALL_TIMEOUT_MS,
            max_instances: 64,
            pool_size: 8,
            max_host_resources: 1_024,
            max_open_files: 64,
            max_http_requests: 16,
            max_http_header_sets: 256,
            max_libvirt_connections: 8,
            log_kib_per_call: 64,
            exec_margin_ms: None,
        }
    }
}

/// The default `long-call-timeout-ms`: 30 minutes.
const DEFAULT_LONG_CALL_TIMEOUT_MS: u64 = 1_800_000;

fn is_default_long(ms: &u64) -> bool {
    *ms == DEFAULT_LONG_CALL_TIMEOUT_MS
}

/// The longest `call-timeout-ms` and `long-call-timeout-ms`: a day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// Ceilings of the per-instance budgets (name, ceiling), checked by [`Limits::validate`].
const BUDGET_CEILINGS: [(&str, u32); 6] = [
    ("max-host-resources", 65_536),
    ("max-open-files", 1_024),
    ("max-http-requests", 256),
    ("max-http-header-sets", 4_096),
    ("max-libvirt-connections", 64),
    ("log-kib-per-call", 16_384),
];

impl Limits {
    /// Limits as a newer release may report them (a plugin's summary): fields this
    /// build does not know are left out rather than refusing the whole answer, so
    /// an older CLI still reads a newer agent. An operator's configuration is read
    /// strictly (a misspelt limit is an error).
    pub fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
        use serde::de::Error as _;
        let mut given = serde_json::Map::deserialize(d)?;
        // Every field is named, so a new one breaks the build here: set it in
        // `every` if it is optional (else its key would not be serialized).
        let Limits {
            memory_mib: _,
            call_timeout_ms: _,
            long_call_timeout_ms: _,
            max_instances: _,
            pool_size: _,
            max_host_resources: _,
            max_open_files: _,
            max_http_requests: _,
            max_http_header_sets: _,
            max_libvirt_connections: _,
            log_kib_per_call: _,
            exec_margin_ms: _,
        } = Limits::default();
        let every = Limits {
            exec_margin_ms: Some(0),
            long_call_timeout_ms: 0,
            ..Limits::default()
        };
        let known = serde_json::to_value(every).map_err(D::Error::custom)?;
        given.retain(|k, _| known.get(k).is_some());
        serde_json::from_value(serde_json::Value::Object(given)).map_err(D::Error::custom)
    }

    /// The operator's exec margin when it is not below the call budget: guest
    /// commands get the budget less the margin, so none would be left.
    pub fn exec_margin_past_budget(&self) -> Option<u64> {
        self.exec_margin_ms.filter(|m| *m >= self.call_timeout_ms)
    }

    /// The per-call budget.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// What a call may wait for long host calls beyond its budget.
    pub fn long_call_timeout(&self) -> Duration {
        Duration::from_millis(self.long_call_timeout_ms)
    }

    /// Checks the limits against the engine's ceilings.
    pub fn validate(&self, max_memory_mib: u64) -> Result<(), String> {
        if self.memory_mib == 0 || self.memory_mib > max_memory_mib {
            return Err(format!(
                "memory-mib must be between 1 and {max_memory_mib} (the engine's ceiling), not {}",
                self.memory_mib
            ));
        }
        if self.call_timeout_ms == 0 || self.call_timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "call-timeout-ms must be between 1 and {MAX_TIMEOUT_MS} (a day), not {}",
                self.call_timeout_ms
            ));
        }
        if self.long_call_timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "long-call-timeout-ms must be at most {MAX_TIMEOUT_MS} (a day), not {}",
                self.long_call_timeout_ms
            ));
        }
        if self.max_instances == 0 || self.pool_size == 0 {
            return Err("max-instances and pool-size must be positive".into());
        }
        let budgets = [
            self.max_host_resources,
            self.max_open_files,
            self.max_http_requests,
            self.max_http_header_sets,
            self.max_libvirt_connections,
            self.log_kib_per_call,
        ];
        for ((name, ceiling), value) in BUDGET_CEILINGS.iter().zip(budgets) {
            if value == 0 || value > *ceiling {
                return Err(format!(
                    "{name} must be between 1 and {ceiling}, not {value}"
                ));
            }
        }
        let most = super::manifest::MAX_EXEC_MARGIN_MS;
        if let Some(m) = self.exec_margin_ms.filter(|m| *m > most) {
            return Err(format!("exec-margin-ms must be at most {most}, not {m}"));
        }
        if let Some(m) = self.exec_margin_past_budget() {
            return Err(format!(
                "exec-margin-ms ({m}) must be below call-timeout-ms ({}): guest \
                 commands get the call budget less the margin",
                self.call_timeout_ms
            ));
        }
        if self.pool_size > self.max_instances {
            return Err(format!(
                "pool-size ({}) cannot exceed max-instances ({})",
                self.pool_size, self.max_instances
            ));
        }
        Ok(())
    }
}

/// Grants intersected with the manifest's requests: exactly what the plugin gets.
#[derive(Debug, Clone, Default)]
pub struct Effective {
    /// Allowed HTTP authorities (lower-case `host:port`).
    pub http: Vec<String>,
    /// Allowed libvirt URIs.
    pub libvirt: Vec<String>,
    /// Guest channel allowed.
    pub guest_channel: bool,
    /// Preopened directories.
    pub directories: Vec<DirGrant>,
    /// Configuration values.
    pub config: BTreeMap<String, String>,
    /// TLS verification per allowed authority that has its own (see [`Grants::tls`]).
    pub tls: BTreeMap<String, Arc<rustls::ClientConfig>>,
    /// Granted but not requested (reported to the operator, not given).
    pub ignored: Vec<String>,
}

/// A `--grant-tls` argument: `HOST:PORT=sha256:HEX` (pin the server's certificate)
/// or `HOST:PORT=ca:PATH` (a CA in PEM; the path is made absolute).
pub fn parse_tls_grant(arg: &str) -> Result<(String, crate::tls::ClientTls), String> {
    let bad = || format!("--grant-tls '{arg}' must be HOST:PORT=sha256:HEX or HOST:PORT=ca:PATH");
    let (authority, how) = arg.split_once('=').ok_or_else(bad)?;
    let trust = match how.split_once(':').ok_or_else(bad)? {
        ("sha256", f) => crate::tls::ClientTls {
            fingerprint: Some(f.to_string()),
            ..Default::default()
        },
        ("ca", path) => crate::tls::ClientTls {
            ca: Some(std::path::absolute(path).map_err(|e| format!("--grant-tls {arg}: {e}"))?),
            ..Default::default()
        },
        _ => return Err(bad()),
    };
    Ok((authority.to_string(), trust))
}

impl Grants {
    /// Checks the grants' own syntax.
    pub fn validate(&self) -> Result<(), String> {
        for a in &self.http {
            let (host, port) = a
                .rsplit_once(':')
                .ok_or_else(|| format!("http grant '{a}' must be host:port"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!(
                    "http grant '{a}' must be host:port with a numeric port"
                ));
            }
        }
        for (a, trust) in &self.tls {
            if !self.http.iter().any(|h| h.eq_ignore_ascii_case(a)) {
                return Err(format!(
                    "tls grant for '{a}': that authority is not in the http grants"
                ));
            }
            match (&trust.fingerprint, &trust.ca) {
                (Some(f), _) => {
                    crate::tls::normalize_fingerprint(f)
                        .map_err(|e| format!("tls grant for '{a}': {e}"))?;
                }
                (None, Some(_)) => {}
                (None, None) => {
                    return Err(format!(
                        "tls grant for '{a}' names neither a fingerprint nor a ca"
                    ))
                }
            }
            trust
                .check_identity()
                .map_err(|e| format!("tls grant for '{a}': {e}"))?;
        }
        for u in &self.libvirt {
            if !u.contains(':') {
                return Err(format!("libvirt grant '{u}' is not a URI"));
            }
        }
        for (key, path) in &self.config_files {
            if self.config.contains_key(key) {
                return Err(format!(
                    "config key '{key}' is given both inline and in config-files: give one"
                ));
            }
            if key.is_empty() || !path.is_absolute() {
                return Err(format!(
                    "config-files entry '{key}' must name a key and an absolute path"
                ));
            }
        }
        for d in &self.directories {
            if !d.host.is_absolute() {
                return Err(format!(
                    "directory grant {} must be an absolute path",
                    d.host.display()
                ));
            }
            if !d.guest.starts_with('/') {
                return Err(format!(
                    "directory grant guest path '{}' must start with /",
                    d.guest
                ));
            }
        }
        Ok(())
    }

    /// The TLS client configuration of each authority with a `tls` grant (reading
    /// its CA and certificate files); says what is wrong.
    pub fn tls_configs(&self) -> Result<BTreeMap<String, Arc<rustls::ClientConfig>>, String> {
        self.tls
            .iter()
            .map(|(a, trust)| {
                let config = trust
                    .client_config()
                    .map_err(|e| format!("tls grant for '{a}': {e}"))?;
                Ok((a.to_ascii_lowercase(), Arc::new(config)))
            })
            .collect()
    }

    /// The values of [`Grants::config_files`], read now; an error names the key
    /// and the file and says what is wrong, never what the file holds.
    pub fn config_file_values(&self) -> Result<BTreeMap<String, String>, String> {
        self.config_files
            .iter()
            .map(|(key, path)| {
                let value = crate::private_fs::read_secret(&format!("config-files.{key}"), path)?;
                Ok((key.clone(), value))
            })
            .collect()
    }

    /// What the plugin actually gets given what it asked for.
    pub fn effective(&self, requests: &Requests) -> Effective {
        let mut e = Effective {
            config: self.config.clone(),
            ..Default::default()
        };
        let mut take = |requested: bool, granted: bool, what: &str| {
            if granted && !requested {
                e.ignored.push(what.to_string());
            }
            requested && granted
        };
        let http = take(requests.http, !self.http.is_empty(), "http");
        let libvirt = take(requests.libvirt, !self.libvirt.is_empty(), "libvirt");
        let guest = take(requests.guest_channel, self.guest_channel, "guest-channel");
        let fs = take(
            requests.filesystem,
            !self.directories.is_empty(),
            "filesystem",
        );
        if http {
            e.http = self.http.iter().map(|a| a.to_ascii_lowercase()).collect();
        }
        if libvirt {
            e.libvirt = self.libvirt.clone();
        }
        e.guest_channel = guest;
        if fs {
            e.directories = self.directories.clone();
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timeouts are bounded (a deadline past what an `Instant` holds would
    /// panic the call that arms it); no long-call budget is allowed.
    #[test]
    fn timeouts_are_at_most_a_day() {
        let with = |call: u64, long: u64| Limits {
            call_timeout_ms: call,
            long_call_timeout_ms: long,
            ..Limits::default()
        };
        for (call, long) in [
            (u64::MAX, 0),
            (MAX_TIMEOUT_MS + 1, 0),
            (1, u64::MAX),
            (0, 0),
        ] {
            let e = with(call, long).validate(64).unwrap_err();
            assert!(e.contains("timeout-ms must be"), "{e}");
        }
        for (call, long) in [(1, 0), (MAX_TIMEOUT_MS, MAX_TIMEOUT_MS)] {
            assert_eq!(with(call, long).validate(64), Ok(()));
        }
    }

    #[test]
    fn limits_from_a_newer_release_are_read_and_a_misspelt_limit_is_not() {
        #[derive(Deserialize)]
        struct Summary {
            #[serde(deserialize_with = "Limits::lenient")]
            limits: Limits,
        }
        let newer = r#"{"limits": {"memory-mib": 96, "exec-margin-ms": 2500,
            "max-gpu-seconds": 7}}"#;
        let s: Summary = serde_json::from_str(newer).unwrap();
        assert_eq!(
            s.limits,
            Limits {
                memory_mib: 96,
                exec_margin_ms: Some(2500),
                ..Limits::default()
            }
        );
        // Every field this build has is read back.
        let every = serde_json::to_value(Limits {
            exec_margin_ms: Some(1),
            long_call_timeout_ms: 5,
            ..Limits::default()
        })
        .unwrap();
        // A default long-call budget is left out, for agents older than it.
        let default = serde_json::to_value(Limits::default()).unwrap();
        assert_eq!(default.get("long-call-timeout-ms"), None, "{default}");
        assert_eq!(every["long-call-timeout-ms"], 5);
        let all: Summary = serde_json::from_value(serde_json::json!({ "limits": every })).unwrap();
        assert_eq!(serde_json::to_value(all.limits).unwrap(), every);
        let wrong = r#"{"limits": {"memory-mib": "lots"}}"#;
        assert!(serde_json::from_str::<Summary>(wrong).is_err());
        let e = serde_json::from_str::<Limits>(r#"{"memory-mb": 96}"#).unwrap_err();
        assert!(e.to_string().contains("memory-mb"), "{e}");
    }

    #[test]
    fn tls_grants_parse_and_must_name_a_granted_authority() {
        let (a, t) =
            parse_tls_grant(&format!("vc.example.org:443=sha256:{}", "AB".repeat(32))).unwrap();
        assert_eq!(a, "vc.example.org:443");
        assert_eq!(t.fingerprint.as_deref(), Some("AB".repeat(32).as_str()));
        let (_, t) = parse_tls_grant("vc.example.org:443=ca:/etc/ca.pem").unwrap();
        assert_eq!(t.ca.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        for bad in ["vc:443", "vc:443=md5:00", "vc:443=sha256"] {
            assert!(parse_tls_grant(bad).is_err(), "{bad}");
        }
        let mut g = Grants {
            http: vec!["VC.example.org:443".into()],
            ..Default::default()
        };
        g.tls.insert("vc.example.org:443".into(), t.clone());
        assert_eq!(g.validate(), Ok(()), "authorities match without case");
        g.tls.insert("other:443".into(), t);
        assert!(g.validate().unwrap_err().contains("not in the http grants"));
        let mut g = Grants {
            http: vec!["vc:443".into()],
            ..Default::default()
        };
        g.tls
            .insert("vc:443".into(), crate::tls::ClientTls::default());
        assert!(g.validate().unwrap_err().contains("neither"));
        g.tls.insert(
            "vc:443".into(),
            crate::tls::ClientTls {
                fingerprint: Some("not-hex".into()),
                ..Default::default()
            },
        );
        assert!(g.validate().is_err());
    }

    #[test]
    fn only_requested_and_granted_is_given() {
        let g = Grants {
            http: vec!["Example.org:443".into()],
            libvirt: vec!["test:///default".into()],
            guest_channel: true,
            ..Default::default()
        };
        let r = Requests {
            http: true,
            libvirt: false,
            guest_channel: true,
            filesystem: true,
        };
        let e = g.effective(&r);
        assert_eq!(e.http, vec!["example.org:443"]);
        assert!(e.libvirt.is_empty());
        assert!(e.guest_channel);
        assert!(e.directories.is_empty());
        assert_eq!(e.ignored, vec!["libvirt"]);
    }

    #[test]
    fn bad_grants_are_named() {
        let g = Grants {
            http: vec!["example.org".into()],
            ..Default::default()
        };
        assert!(g.validate().unwrap_err().contains("example.org"));
        let g = Grants {
            directories: vec![DirGrant {
                host: "rel".into(),
                guest: "/x".into(),
                writable: false,
            }],
            ..Default::default()
        };
        assert!(g.validate().unwrap_err().contains("absolute"));
        let mut g = Grants {
            http: vec!["vc:443".into()],
            ..Default::default()
        };
        g.tls.insert(
            "vc:443".into(),
            crate::tls::ClientTls {
                ca: Some("/ca.pem".into()),
                cert: Some("/me.pem".into()),
                ..Default::default()
            },
        );
        let e = g.validate().unwrap_err();
        assert!(e.contains("vc:443") && e.contains("key"), "{e}");
        assert!(Limits {
            memory_mib: 4096,
            ..Default::default()
        }
        .validate(1024)
        .is_err());
    }

    #[test]
    fn config_files_are_read_at_load_only_when_private_and_never_beside_an_inline_value() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("guest.pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut g = Grants::default();
        g.config_files.insert("guest-password".into(), file.clone());
        assert_eq!(g.validate(), Ok(()));
        let values = g.config_file_values().unwrap();
        assert_eq!(values["guest-password"], "s3cret");
        // Others may read it: refused, naming the key and the file, not the secret.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = g.config_file_values().unwrap_err();
        assert!(
            e.contains("config-files.guest-password") && e.contains("open to other users"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        // Not both inline and from a file; only absolute paths.
        g.config.insert("guest-password".into(), "inline".into());
        assert!(g
            .validate()
            .unwrap_err()
            .contains("both inline and in config-files"));
        g.config.clear();
        g.config_files.insert("other".into(), "relative.pw".into());
        assert!(g.validate().unwrap_err().contains("absolute path"));
        // Never shown when the grants are serialized empty-handed, and their
        // paths (not values) when set.
        let json = serde_json::to_string(&g).unwrap();
        assert!(
            json.contains("config-files") && !json.contains("s3cret"),
            "{json}"
        );
        assert!(!serde_json::to_string(&Grants::default())
            .unwrap()
            .contains("config-files"));
    }
}
