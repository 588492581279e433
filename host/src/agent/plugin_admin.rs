//! Plugin administration at runtime, inside the operator's [`PluginPolicy`]: load,
//! replace (keeping the running version's grants, limits and config unless new
//! ones are given) and unload, each recorded in the agent's database so that a
//! restarted agent comes back with exactly the plugins it had. Config values in a
//! record are sealed under `agent.key` ([`Sealer`]): they may be credentials.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use super::policy::PluginPolicy;
use super::registry::Registry;
use crate::api::ApiError;
use crate::plugin::manifest::Bundle;
use crate::plugin::{Grants, Limits, PluginError, PluginHost, PluginSpec, PluginSummary};
use crate::sealing::Sealer;

/// Registry meta keys of recorded plugins: `plugin:<name>`.
const PREFIX: &str = "plugin:";

/// What the agent's database says of a plugin changed at runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
enum Recorded {
    /// Loaded (or replaced) with this spec.
    Loaded {
        /// The spec in force.
        spec: Box<PluginSpec>,
    },
    /// Unloaded.
    Unloaded,
}

/// Changes to some of a plugin's limits; the others are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsPatch {
    /// Memory cap per instance, MiB.
    pub memory_mib: Option<u64>,
    /// Budget of one call, ms.
    pub call_timeout_ms: Option<u64>,
    /// What a call may wait beyond its budget for long host calls, ms (left out
    /// when not given, so that an agent older than it still takes the patch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long_call_timeout_ms: Option<u64>,
    /// Most instances at once.
    pub max_instances: Option<u32>,
    /// Warm instances.
    pub pool_size: Option<u32>,
    /// The operator's exec margin, ms (raises the manifest's); 0 drops it, so the
    /// manifest's is in force.
    pub exec_margin_ms: Option<u64>,
}

/// Lowers plugin `plugin`'s recorded limit `what` to `most`, when over it, with a
/// warning saying `why`.
fn lower(plugin: &str, what: &str, value: &mut u64, most: u64, why: &str) {
    if *value > most {
        tracing::warn!(plugin, "recorded {what} {value} is {why}: {most} in force");
        *value = most;
    }
}

/// The body of `PUT /v1/plugins/{name}`: what changes; the rest is kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplaceSpec {
    /// The new version's bundle (default: the current bundle path, re-read).
    pub bundle: Option<PathBuf>,
    /// New grants, replacing the current ones whole.
    pub grants: Option<Grants>,
    /// New limits, field by field.
    pub limits: Option<LimitsPatch>,
}

impl ReplaceSpec {
    /// `current` with this change applied.
    pub fn apply(&self, current: &PluginSpec) -> PluginSpec {
        let mut spec = current.clone();
        if let Some(b) = &self.bundle {
            spec.bundle = b.clone();
        }
        if let Some(g) = &self.grants {
            spec.grants = g.clone();
        }
        if let Some(l) = &self.limits {
            let m: &mut Limits = &mut spec.limits;
            m.memory_mib = l.memory_mib.unwrap_or(m.memory_mib);
            m.call_timeout_ms = l.call_timeout_ms.unwrap_or(m.call_timeout_ms);
            m.long_call_timeout_ms = l.long_call_timeout_ms.unwrap_or(m.long_call_timeout_ms);
            m.max_instances = l.max_instances.unwrap_or(m.max_instances);
            m.pool_size = l.pool_size.unwrap_or(m.pool_size);
            if let Some(margin) = l.exec_margin_ms {
                m.exec_margin_ms = (margin != 0).then_some(margin);
            }
        }
        spec
    }
}

/// The plugin host as the admin API drives it.
pub struct PluginAdmin {
    host: PluginHost,
    registry: Registry,
    /// Seals the config values of what is recorded.
    sealer: Arc<Sealer>,
    policy: PluginPolicy,
    /// The spec in force of every loaded plugin.
    specs: Mutex<BTreeMap<String, PluginSpec>>,
    /// The files the agent's config file gives each of its plugins.
    from_file: BTreeMap<String, FromFile>,
}

/// The files the agent's config file gives one plugin: the only files the agent
/// reads for it, whatever an admin sends or a record says. The agent would
/// otherwise read any file of its user an admin named and lend it to a plugin,
/// which may send it to a host it is granted (or present the agent's own key).
#[derive(Debug, Clone, Default)]
struct FromFile {
    /// Its `config-files`.
    config_files: BTreeMap<String, PathBuf>,
    /// The CA, certificate and key files of its `tls` grants: (authority in
    /// lower case, which of the three, path).
    tls_files: BTreeSet<(String, &'static str, PathBuf)>,
}

/// The files of one `tls` grant: which (`ca`, `cert`, `key`) and where.
fn tls_files(t: &crate::tls::ClientTls) -> impl Iterator<Item = (&'static str, &PathBuf)> {
    [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)]
        .into_iter()
        .filter_map(|(what, p)| p.as_ref().map(|p| (what, p)))
}

impl FromFile {
    fn of(spec: &PluginSpec) -> FromFile {
        let tls_files = spec
            .grants
            .tls
            .iter()
            .flat_map(|(a, t)| {
                tls_files(t).map(move |(what, p)| (a.to_ascii_lowercase(), what, p.clone()))
            })
            .collect();
        FromFile {
            config_files: spec.grants.config_files.clone(),
            tls_files,
        }
    }
}

/// Refuses `config-files` through the API: they come from the agent's config
/// file (see [`FromFile`]), and a replace that keeps the grants keeps them.
fn no_config_files(g: &Grants) -> Result<(), ApiError> {
    if g.config_files.is_empty() {
        return Ok(());
    }
    Err(denied(
        "config-files may not be granted through the API (the agent's config file \
         sets them); give values in config"
            .into(),
    ))
}

fn denied(m: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "denied", m)
}

fn db(e: super::registry::RegistryError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string())
}

impl PluginAdmin {
    /// Administration of `host`, whose plugins from the config file are `configured`.
    pub fn new(
        host: PluginHost,
        registry: Registry,
        sealer: Arc<Sealer>,
        policy: PluginPolicy,
        configured: &BTreeMap<String, PluginSpec>,
    ) -> PluginAdmin {
        PluginAdmin {
            host,
            registry,
            sealer,
            policy,
            specs: Mutex::new(configured.clone()),
            from_file: configured
                .iter()
                .map(|(name, spec)| (name.clone(), FromFile::of(spec)))
                .collect(),
        }
    }

    /// Refuses TLS files (CA, client certificate, key) in `g` other than those
    /// the agent's config file gives plugin `name`, each for the same authority
    /// and as the same file: a fingerprint needs no file.
    fn tls_files_from_the_config_file(&self, name: &str, g: &Grants) -> Result<(), ApiError> {
        let allowed = self.from_file.get(name);
        for (authority, t) in &g.tls {
            for (what, path) in tls_files(t) {
                let given = (authority.to_ascii_lowercase(), what, path.clone());
                if !allowed.is_some_and(|f| f.tls_files.contains(&given)) {
                    return Err(denied(format!(
                        "TLS file {} (as the {what} for '{authority}') may not be granted \
                         to plugin '{name}' through the API: only the files the agent's \
                         config file gives it, for that authority (a fingerprint needs no \
                         file)",
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// A recorded spec as it may be restored: each secret value the record has
    /// (inline or from a file) that the config file now reads from a file is
    /// taken from the config file's file; the record's other files are dropped
    /// (a value an admin's replace dropped stays dropped); no TLS file but
    /// the config file's; no operator exec margin that is not below the call
    /// budget (recorded before that was refused); no call budget over a day; and
    /// no long-call budget above the policy's ceiling (a record from before long
    /// calls has the default).
    fn restorable(&self, name: &str, mut spec: PluginSpec) -> Result<PluginSpec, ApiError> {
        let files = self
            .from_file
            .get(name)
            .map(|f| f.config_files.clone())
            .unwrap_or_default();
        let recorded = std::mem::take(&mut spec.grants.config_files);
        for (key, path) in files {
            let inline = spec.grants.config.remove(&key).is_some();
            if inline || recorded.contains_key(&key) {
                spec.grants.config_files.insert(key, path);
            }
        }
        self.tls_files_from_the_config_file(name, &spec.grants)?;
        // Recorded before a margin had to be below the call budget: the plugin's
        // own margin is in force rather than the plugin left out.
        if let Some(m) = spec.limits.exec_margin_past_budget() {
            tracing::warn!(
                plugin = name,
                "recorded exec-margin-ms {m} is not below call-timeout-ms {}: dropped",
                spec.limits.call_timeout_ms
            );
            spec.limits.exec_margin_ms = None;
        }
        // Recorded before call budgets were bounded: the longest one allowed.
        let limits = &mut spec.limits;
        let most = crate::plugin::grants::MAX_TIMEOUT_MS;
        lower(
            name,
            "call-timeout-ms",
            &mut limits.call_timeout_ms,
            most,
            "over a day",
        );
        // Recorded before long-call budgets (or with the default, which is not
        // written): the default, unless the policy's ceiling is lower.
        let ceiling = self.policy.max_long_call_timeout_ms;
        let why = "above the policy's ceiling";
        lower(
            name,
            "long-call-timeout-ms",
            &mut limits.long_call_timeout_ms,
            ceiling,
            why,
        );
        Ok(spec)
    }

    /// The plugin host.
    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    fn specs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PluginSpec>> {
        self.specs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `spec` as the one in force of plugin `name`, its config values
    /// sealed.
    fn record_loaded(&self, name: &str, spec: &PluginSpec) -> Result<(), ApiError> {
        let mut sealed = spec.clone();
        self.sealer.seal_all(sealed.grants.config.values_mut());
        self.record(
            name,
            &Recorded::Loaded {
                spec: Box::new(sealed),
            },
        )
    }

    /// A recorded spec with its config values unsealed, and whether any was
    /// recorded in the clear (by a release before they were sealed).
    fn unsealed(&self, mut spec: PluginSpec) -> Result<(PluginSpec, bool), String> {
        let values = spec.grants.config.iter_mut();
        let plain = self
            .sealer
            .open_all(values.map(|(key, v)| (key.as_str(), v)))
            .map_err(|(key, e)| {
                format!(
                    "its recorded config value '{key}' cannot be read ({e}): put back the \
                     agent.key it was sealed under, or load the plugin again"
                )
            })?;
        Ok((spec, plain))
    }

    fn record(&self, name: &str, rec: &Recorded) -> Result<(), ApiError> {
        let json = serde_json::to_string(rec).map_err(|e| denied(e.to_string()))?;
        self.registry
            .write(|t| t.set_meta(&format!("{PREFIX}{name}"), &json))
            .map_err(db)
    }

    /// Applies what earlier runs changed at runtime (on top of the config file).
    /// A recorded plugin that no longer fits the policy, or fails to load, is left
    /// out and said so; the agent starts anyway.
    pub async fn restore(&self) -> Result<(), ApiError> {
        for (name, json) in self.registry.meta_with_prefix(PREFIX).map_err(db)? {
            let rec: Recorded = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(plugin = name, "unreadable plugin record: {e}");
                    continue;
                }
            };
            let loaded = self.specs().contains_key(&name);
            let outcome = match rec {
                Recorded::Unloaded if loaded => self
                    .host
                    .unload(&name)
                    .map(|()| {
                        self.specs().remove(&name);
                    })
                    .map_err(ApiError::from),
                Recorded::Unloaded => Ok(()),
                Recorded::Loaded { spec: sealed } => {
                    let recorded = match self.unsealed(*sealed) {
                        Ok((recorded, plain)) => {
                            // Sealed as it is, whether or not it is restored below.
                            if plain {
                                if let Err(e) = self.record_loaded(&name, &recorded) {
                                    tracing::error!(
                                        plugin = name,
                                        "its record stays unsealed: {}",
                                        e.message
                                    );
                                }
                            }
                            recorded
                        }
                        Err(e) => {
                            tracing::error!(plugin = name, "not restored: {e}");
                            continue;
                        }
                    };
                    let spec = match self.restorable(&name, recorded.clone()) {
                        Ok(spec) => spec,
                        Err(e) => {
                            tracing::error!(plugin = name, "not restored: {}", e.message);
                            continue;
                        }
                    };
                    // The record is to say what is in force: an inline value the
                    // config file has since moved to a file leaves it, as does a
                    // margin dropped above.
                    let rewrite = |spec: &PluginSpec| {
                        if recorded == *spec {
                            return;
                        }
                        if let Err(e) = self.record_loaded(&name, spec) {
                            tracing::error!(
                                plugin = name,
                                "its record still holds what the config file changed since: {}",
                                e.message
                            );
                        }
                    };
                    if self.specs().get(&name) == Some(&spec) {
                        rewrite(&spec);
                        continue;
                    }
                    let r = match self.policy.check(&spec) {
                        Err(e) => Err(denied(e.to_string())),
                        Ok(spec) if loaded => self
                            .host
                            .replace(&name, spec)
                            .await
                            .map(drop)
                            .map_err(ApiError::from),
                        // Only as the plugin the record (and its files) is for.
                        Ok(spec) => self
                            .host
                            .load_named(&name, spec)
                            .await
                            .map(drop)
                            .map_err(ApiError::from),
                    };
                    if r.is_ok() {
                        self.specs().insert(name.clone(), spec.clone());
                        rewrite(&spec);
                    }
                    r
                }
            };
            match outcome {
                Ok(()) => tracing::info!(plugin = name, "restored as recorded at runtime"),
                Err(e) => tracing::error!(plugin = name, "not restored: {}", e.message),
            }
        }
        Ok(())
    }

    /// Loads a plugin within the policy and records it.
    pub async fn load(&self, spec: PluginSpec) -> Result<PluginSummary, ApiError> {
        no_config_files(&spec.grants)?;
        let spec = self
            .policy
            .check(&spec)
            .map_err(|e| denied(e.to_string()))?;
        // The files are checked for the plugin the manifest names now; the load
        // takes the bundle only if it still names that plugin when it is read again.
        let name = Bundle::read(&spec.bundle)?.manifest.name;
        self.tls_files_from_the_config_file(&name, &spec.grants)?;
        let summary = self.host.load_named(&name, spec.clone()).await?;
        self.record_loaded(&summary.name, &spec)?;
        self.audit("plugin.load", &summary.name, &spec)?;
        self.specs().insert(summary.name.clone(), spec);
        Ok(summary)
    }

    /// Replaces a plugin: `change` applied to the spec in force, within the policy.
    pub async fn replace(
        &self,
        name: &str,
        change: ReplaceSpec,
    ) -> Result<PluginSummary, ApiError> {
        let current = self
            .specs()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::from(PluginError::NotLoaded(name.to_string())))?;
        if let Some(g) = &change.grants {
            no_config_files(g)?;
            self.tls_files_from_the_config_file(name, g)?;
        }
        let spec = self
            .policy
            .check(&change.apply(&current))
            .map_err(|e| denied(e.to_string()))?;
        let summary = self.host.replace(name, spec.clone()).await?;
        self.record_loaded(name, &spec)?;
        self.audit("plugin.replace", name, &spec)?;
        self.specs().insert(name.to_string(), spec);
        Ok(summary)
    }

    /// Unloads a plugin and records it.
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        self.host.unload(name)?;
        self.specs().remove(name);
        self.record(name, &Recorded::Unloaded)?;
        self.registry
            .audit("plugin.unload", name, serde_json::Value::Null)
            .map_err(db)
    }

    /// Audits a load or replace: the bundle, grants and limits (config values are
    /// named, not shown: they may hold secrets).
    fn audit(&self, action: &str, name: &str, spec: &PluginSpec) -> Result<(), ApiError> {
        let g = &spec.grants;
        let detail = serde_json::json!({
            "bundle": spec.bundle,
            "http": g.http, "libvirt": g.libvirt, "guest-channel": g.guest_channel,
            "directories": g.directories, "config-keys": g.config.keys().collect::<Vec<_>>(),
            "config-files": g.config_files,
            "limits": spec.limits,
        });
        self.registry.audit(action, name, detail).map_err(db)
    }
}
