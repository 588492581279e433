//! The operator's ceiling on plugin administration (`[plugin-policy]` in the agent's
//! config): from which directories the admin API may load bundles, and the most it
//! may grant (HTTP authorities, libvirt URIs, directories and their writability, the
//! guest channel, memory, call and long-call budgets, instances). The config file itself is the
//! operator's word and is not held to it; everything sent over the API is.
//!
//! Without a `[plugin-policy]`, the ceiling is what the config file already gives:
//! bundles from the directories its plugins live in, grants from the union of its
//! plugins' grants, limits up to the largest it sets.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plugin::{DirGrant, Limits, PluginSpec};

/// A directory the admin API may grant, and whether writable grants of it are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirCeiling {
    /// A host directory; grants of it or of directories under it are allowed.
    pub host: PathBuf,
    /// Whether such grants may be writable.
    #[serde(default)]
    pub writable: bool,
}

/// The most the agent's admin API may ever load and grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginPolicy {
    /// Directories bundles may be loaded from (the bundle, symlinks resolved, must
    /// lie inside one).
    #[serde(default)]
    pub bundle_dirs: Vec<PathBuf>,
    /// HTTP authorities (`host:port`) that may be granted.
    #[serde(default)]
    pub http: Vec<String>,
    /// libvirt URIs that may be granted.
    #[serde(default)]
    pub libvirt: Vec<String>,
    /// Directories that may be granted.
    #[serde(default)]
    pub directories: Vec<DirCeiling>,
    /// Whether the guest channel may be granted.
    #[serde(default)]
    pub guest_channel: bool,
    /// Largest memory cap per instance, MiB.
    #[serde(default = "default_memory")]
    pub max_memory_mib: u64,
    /// Largest call budget, ms.
    #[serde(default = "default_timeout")]
    pub max_call_timeout_ms: u64,
    /// Largest long-call budget (`long-call-timeout-ms`), ms.
    #[serde(default = "default_long_timeout")]
    pub max_long_call_timeout_ms: u64,
    /// Most instances per plugin.
    #[serde(default = "default_instances")]
    pub max_instances: u32,
}

fn default_memory() -> u64 {
    Limits::default().memory_mib
}

fn default_timeout() -> u64 {
    Limits::default().call_timeout_ms
}

fn default_long_timeout() -> u64 {
    Limits::default().long_call_timeout_ms
}

fn default_instances() -> u32 {
    Limits::default().max_instances
}

/// Why the admin API refused a plugin spec.
#[derive(Debug, thiserror::Error)]
#[error("refused by the agent's plugin policy: {0}")]
pub struct PolicyError(pub String);

/// `path` with symlinks resolved, or why not.
fn real(path: &Path) -> Result<PathBuf, PolicyError> {
    std::fs::canonicalize(path).map_err(|e| PolicyError(format!("{}: {e}", path.display())))
}

impl PluginPolicy {
    /// The ceiling a config file without `[plugin-policy]` implies.
    pub fn implied_by<'a>(specs: impl IntoIterator<Item = &'a PluginSpec>) -> PluginPolicy {
        let mut p = PluginPolicy {
            bundle_dirs: Vec::new(),
            http: Vec::new(),
            libvirt: Vec::new(),
            directories: Vec::new(),
            guest_channel: false,
            max_memory_mib: default_memory(),
            max_call_timeout_ms: default_timeout(),
            max_long_call_timeout_ms: default_long_timeout(),
            max_instances: default_instances(),
        };
        for s in specs {
            let dir = if s.bundle.is_file() {
                s.bundle.parent().and_then(Path::parent)
            } else {
                s.bundle.parent()
            };
            if let Some(d) = dir {
                p.bundle_dirs.push(d.to_path_buf());
            }
            p.http.extend(s.grants.http.iter().cloned());
            p.libvirt.extend(s.grants.libvirt.iter().cloned());
            p.directories
                .extend(s.grants.directories.iter().map(|d| DirCeiling {
                    host: d.host.clone(),
                    writable: d.writable,
                }));
            p.guest_channel |= s.grants.guest_channel;
            p.max_memory_mib = p.max_memory_mib.max(s.limits.memory_mib);
            p.max_call_timeout_ms = p.max_call_timeout_ms.max(s.limits.call_timeout_ms);
            p.max_long_call_timeout_ms = p
                .max_long_call_timeout_ms
                .max(s.limits.long_call_timeout_ms);
            p.max_instances = p.max_instances.max(s.limits.max_instances);
        }
        p.bundle_dirs.sort();
        p.bundle_dirs.dedup();
        p
    }

    /// Checks a spec sent over the admin API; on success returns it with its bundle
    /// path resolved (symlinks followed), which is what gets loaded.
    pub fn check(&self, spec: &PluginSpec) -> Result<PluginSpec, PolicyError> {
        let mut spec = spec.clone();
        let bundle = real(&spec.bundle)?;
        let inside = self
            .bundle_dirs
            .iter()
            .filter_map(|d| real(d).ok())
            .any(|d| bundle.starts_with(&d));
        if !inside {
            return Err(PolicyError(format!(
                "bundle {} is outside the directories plugins may be loaded from ({})",
                bundle.display(),
                list(self.bundle_dirs.iter().map(|d| d.display().to_string()))
            )));
        }
        spec.bundle = bundle;
        let g = &spec.grants;
        for a in &g.http {
            if !self.http.contains(a) {
                return Err(PolicyError(format!(
                    "HTTP authority {a} may not be granted (allowed: {})",
                    list(self.http.iter().cloned())
                )));
            }
        }
        for u in &g.libvirt {
            if !self.libvirt.contains(u) {
                return Err(PolicyError(format!(
                    "libvirt URI {u} may not be granted (allowed: {})",
                    list(self.libvirt.iter().cloned())
                )));
            }
        }
        for d in &g.directories {
            self.check_dir(d)?;
        }
        if g.guest_channel && !self.guest_channel {
            return Err(PolicyError("the guest channel may not be granted".into()));
        }
        let l = &spec.limits;
        if l.memory_mib > self.max_memory_mib {
            return Err(PolicyError(format!(
                "memory-mib {} is above the ceiling of {}",
                l.memory_mib, self.max_memory_mib
            )));
        }
        if l.call_timeout_ms > self.max_call_timeout_ms {
            return Err(PolicyError(format!(
                "call-timeout-ms {} is above the ceiling of {}",
                l.call_timeout_ms, self.max_call_timeout_ms
            )));
        }
        if l.long_call_timeout_ms > self.max_long_call_timeout_ms {
            return Err(PolicyError(format!(
                "long-call-timeout-ms {} is above the ceiling of {}",
                l.long_call_timeout_ms, self.max_long_call_timeout_ms
            )));
        }
        if l.max_instances > self.max_instances {
            return Err(PolicyError(format!(
                "max-instances {} is above the ceiling of {}",
                l.max_instances, self.max_instances
            )));
        }
        Ok(spec)
    }

    fn check_dir(&self, d: &DirGrant) -> Result<(), PolicyError> {
        let host = real(&d.host)?;
        let ok = self.directories.iter().any(|c| {
            real(&c.host).is_ok_and(|top| host.starts_with(top)) && (c.writable || !d.writable)
        });
        if ok {
            Ok(())
        } else {
            Err(PolicyError(format!(
                "directory {} may not be granted{} (allowed: {})",
                host.display(),
                if d.writable { " writable" } else { "" },
                list(self.directories.iter().map(|c| format!(
                    "{}{}",
                    c.host.display(),
                    if c.writable { " (rw)" } else { "" }
                )))
            )))
        }
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
