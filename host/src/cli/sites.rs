//! Named sites: a grid user works with several computing centres. Their URLs,
//! tokens and pinned certificates are kept in one file, `sites.toml` in the
//! user's config directory (`$GVE_CONFIG` names another), made 0600 in a 0700
//! directory; a file others can read is refused, as ssh refuses such keys.
//!
//! Which site a command talks to: `--site NAME` / `GVE_SITE` (that site's stored
//! URL and credentials, nothing from the environment, so one site's token is
//! never sent to another); else `--url` / `GVE_URL` with `--token` /
//! `GVE_TOKEN`; else the current site (`gve site use`); else
//! `http://127.0.0.1:7080`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CliError, SiteOpts};
use crate::site::model::UserView;

/// The site a command talks to when nothing names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7080";

/// The sites file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SitesFile {
    /// The site commands use when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Sites by name.
    #[serde(default)]
    pub sites: BTreeMap<String, NamedSite>,
}

/// One site as kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NamedSite {
    /// Base URL.
    pub url: String,
    /// Your bearer token there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// SHA-256 fingerprint of its certificate (https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// A CA certificate (PEM) its certificate chains to (https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Your client certificate (PEM) for a site that requires one (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// Where the sites file is: `$GVE_CONFIG`, else `$XDG_CONFIG_HOME/gve/sites.toml`,
/// else `~/.config/gve/sites.toml`.
pub fn path() -> Result<PathBuf, CliError> {
    if let Some(p) = std::env::var_os("GVE_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .ok_or_else(|| {
            CliError::Usage("no config directory: set HOME, XDG_CONFIG_HOME or GVE_CONFIG".into())
        })?;
    Ok(base.join("gve").join("sites.toml"))
}

/// A site name: 1-64 of `a-z A-Z 0-9 . _ -`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), CliError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "site name {name:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

impl SitesFile {
    /// Reads the file at `path`; a missing file is an empty one. A file others can
    /// read or write is refused (it holds tokens).
    pub fn load(path: &Path) -> Result<SitesFile, CliError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SitesFile::default()),
            Err(e) => return Err(CliError::file(path, e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CliError::Usage(format!(
                "{}: mode {mode:03o} lets others read your site tokens; run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| CliError::file(path, e))?;
        let file: SitesFile = toml::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        if let Some(c) = &file.current {
            if !file.sites.contains_key(c) {
                return Err(CliError::Usage(format!(
                    "{}: the current site '{c}' is not in the file",
                    path.display()
                )));
            }
        }
        Ok(file)
    }

    /// Writes the file at `path` (0600, its directory 0700; replaced whole).
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        // A missing directory is made 0700; an existing one is left as it is
        // (it may be $HOME, /tmp or the current directory).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                crate::private_fs::private_dir(dir).map_err(|e| CliError::file(dir, e))?;
            }
        }
        let text = toml::to_string_pretty(self)
            .map_err(|e| CliError::Usage(format!("cannot encode {}: {e}", path.display())))?;
        crate::private_fs::write_private(path, text.as_bytes()).map_err(|e| CliError::file(path, e))
    }

    /// Site `name`, or a usage error naming the known ones.
    pub fn get(&self, name: &str) -> Result<&NamedSite, CliError> {
        self.sites.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.sites.keys().map(String::as_str).collect();
            CliError::Usage(format!(
                "no site named '{name}' (known: {}); add it with `gve site add {name} --url URL`",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }
}

impl NamedSite {
    /// Options that reach this site, printing in `output`.
    pub fn opts(&self, name: &str, output: super::output::Output) -> SiteOpts {
        SiteOpts {
            url: Some(self.url.clone()),
            site: None,
            resolved_name: Some(name.to_string()),
            token: self.token.clone(),
            fingerprint: self.fingerprint.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            output,
        }
    }
}

impl SiteOpts {
    /// The options with the site chosen (see the module doc): the URL and
    /// credentials the command will use.
    pub fn resolve(&self) -> Result<SiteOpts, CliError> {
        if let Some(name) = &self.site {
            validate_name(name)?;
            let file = SitesFile::load(&path()?)?;
            let site = file.get(name)?.opts(name, self.output);
            // Named sites use their stored credentials only; say so when others
            // were given (a command must not silently go elsewhere than asked).
            let ignored: Vec<&str> = [
                ("--url/GVE_URL", self.url.is_some() && self.url != site.url),
                (
                    "--token/GVE_TOKEN",
                    self.token.is_some() && self.token != site.token,
                ),
                (
                    "--cert/GVE_CERT",
                    self.cert.is_some() && self.cert != site.cert,
                ),
            ]
            .into_iter()
            .filter_map(|(what, differs)| differs.then_some(what))
            .collect();
            if !ignored.is_empty() {
                eprintln!(
                    "gve: using site {name} ({}) with its stored credentials; ignoring {}",
                    site.base_url(),
                    ignored.join(" and ")
                );
            }
            return Ok(site);
        }
        if self.url.is_some() {
            return Ok(self.clone());
        }
        // No config directory at all (no HOME): no named sites either.
        if let Ok(path) = path() {
            let file = SitesFile::load(&path)?;
            if let Some(name) = &file.current {
                return Ok(file.get(name)?.opts(name, self.output));
            }
        }
        Ok(SiteOpts {
            url: Some(DEFAULT_URL.into()),
            ..self.clone()
        })
    }

    /// The base URL (after [`SiteOpts::resolve`]).
    pub fn base_url(&self) -> &str {
        self.url.as_deref().unwrap_or(DEFAULT_URL)
    }
}

/// Every named site's options, in name order (for `--all-sites` and
/// `--any-site`); a usage error when none is kept.
pub fn all(output: super::output::Output) -> Result<Vec<SiteOpts>, CliError> {
    let path = path()?;
    let file = SitesFile::load(&path)?;
    if file.sites.is_empty() {
        return Err(CliError::Usage(format!(
            "no sites in {}; add them with `gve site add NAME --url URL`",
            path.display()
        )));
    }
    Ok(file
        .sites
        .iter()
        .map(|(name, s)| s.opts(name, output))
        .collect())
}

/// Runs `call` against every named site at once; returns each site's answer in
/// name order. Prints a warning for each site that failed; fails (with the first
/// error) only when every site did.
pub async fn across<T, F, Fut>(sites: Vec<SiteOpts>, call: F) -> Result<Vec<(String, T)>, CliError>
where
    F: Fn(SiteOpts) -> Fut,
    Fut: std::future::Future<Output = Result<T, CliError>> + Send + 'static,
    T: Send + 'static,
{
    let mut tasks = Vec::new();
    for s in sites {
        let name = s.resolved_name.clone().unwrap_or_default();
        tasks.push((name, tokio::spawn(call(s))));
    }
    let mut ok = Vec::new();
    let mut first_err = None;
    let total = tasks.len();
    for (name, task) in tasks {
        match task.await {
            Ok(Ok(v)) => ok.push((name, v)),
            Ok(Err(e)) => {
                eprintln!("warning: site {name}: {e}");
                first_err.get_or_insert(e);
            }
            Err(e) => {
                eprintln!("warning: site {name}: {e}");
            }
        }
    }
    if ok.is_empty() {
        return Err(first_err.unwrap_or_else(|| CliError::Usage("no site answered".into())));
    }
    if ok.len() < total {
        eprintln!(
            "warning: partial results: {} of {total} sites answered",
            ok.len()
        );
    }
    Ok(ok)
}

/// What `gve vm request --any-site` asks for.
#[derive(Debug, Clone)]
pub struct Profile {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Template, if named.
    pub template: Option<String>,
    /// OS family or name, if named.
    pub os_family: Option<String>,
}

/// How much room a site has for `p`, by its GLUE 2 document and the caller's own
/// record there: the largest new VM placement would grant (MiB), or why it has
/// none.
pub fn room_for(glue: &serde_json::Value, me: &UserView, p: &Profile) -> Result<u64, String> {
    let share = &glue["ComputingShare"][0];
    let serving = share["ServingState"].as_str().unwrap_or("unknown");
    if serving != "production" {
        return Err(format!("not taking requests (serving state {serving})"));
    }
    let (q, u) = (&me.quota, &me.usage);
    if u.vms.saturating_add(1) > q.vms
        || u.logical_cpus.saturating_add(p.cpus.into()) > q.logical_cpus
        || u.main_memory_mib.saturating_add(p.memory_mib) > q.main_memory_mib
    {
        return Err(format!(
            "your quota is full ({}/{} VMs, {}/{} vCPUs, {}/{} MiB)",
            u.vms, q.vms, u.logical_cpus, q.logical_cpus, u.main_memory_mib, q.main_memory_mib
        ));
    }
    let wanted = |ee: &&serde_json::Value| {
        let is = |key: &str, want: &str| {
            ee[key]
                .as_str()
                .is_some_and(|v| v.eq_ignore_ascii_case(want))
        };
        p.template.as_deref().is_none_or(|t| is("Name", t))
            && p.os_family
                .as_deref()
                .is_none_or(|f| is("OSFamily", f) || is("OSName", f))
    };
    let best = glue["ExecutionEnvironment"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(wanted)
        .filter_map(|ee| ee["Extension"]["FreeMainMemory"].as_u64())
        .max();
    match best {
        None => Err(match (&p.template, &p.os_family) {
            (Some(t), _) => format!("no template '{t}'"),
            (None, Some(f)) => format!("no template of OS '{f}'"),
            (None, None) => "no template offered".to_string(),
        }),
        Some(room) if room < p.memory_mib => Err(format!(
            "{room} MiB free for a new VM, {} asked",
            p.memory_mib
        )),
        Some(room) => Ok(room),
    }
}

/// The named site with the most room for `p` (reading every site's GLUE 2
/// document and the caller's record there at once); prints the choice and why
/// each other site was not chosen on stderr.
pub async fn pick(output: super::output::Output, p: &Profile) -> Result<SiteOpts, CliError> {
    let sites = all(output)?;
    let mut tasks = Vec::new();
    for s in sites {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let got = async {
                let c = s.client()?;
                let glue: serde_json::Value = c.get("/v1/glue2").await?;
                let me: UserView = c.get("/v1/me").await?;
                Ok::<_, CliError>(room_for(&glue, &me, &p))
            }
            .await;
            (s, got)
        }));
    }
    let mut best: Option<(u64, SiteOpts)> = None;
    let mut why = Vec::new();
    for t in tasks {
        let Ok((s, got)) = t.await else { continue };
        let name = s.resolved_name.clone().unwrap_or_default();
        match got {
            Ok(Ok(room)) => {
                if best.as_ref().is_none_or(|(r, _)| room > *r) {
                    best = Some((room, s));
                }
            }
            Ok(Err(reason)) => why.push(format!("{name}: {reason}")),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    match best {
        Some((room, s)) => {
            eprintln!(
                "placing on site {} ({room} MiB free for a new VM){}",
                s.resolved_name.as_deref().unwrap_or_default(),
                if why.is_empty() {
                    String::new()
                } else {
                    format!("; not: {}", why.join("; "))
                }
            );
            Ok(s)
        }
        None => Err(CliError::NoRoom(format!(
            "no site has room for {} vCPUs, {} MiB{}: {}",
            p.cpus,
            p.memory_mib,
            p.template
                .as_ref()
                .map(|t| format!(" from template '{t}'"))
                .unwrap_or_default(),
            why.join("; ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_are_plain() {
        for good in ["cern", "fzk-1", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_file_is_private_and_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("cfg/gve/sites.toml");
        assert_eq!(SitesFile::load(&p).unwrap(), SitesFile::default());
        let mut f = SitesFile::default();
        f.sites.insert(
            "cern".into(),
            NamedSite {
                url: "https://cern.example:7080".into(),
                token: Some("gve_secret".into()),
                fingerprint: None,
                ca: None,
                cert: Some("/home/u/.gve/me.pem".into()),
                key: Some("/home/u/.gve/me.key".into()),
            },
        );
        f.current = Some("cern".into());
        f.save(&p).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        assert_eq!(SitesFile::load(&p).unwrap(), f);
        // Readable by others: refused, with the fix.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SitesFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // A current site that is not there is refused.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "current = \"nope\"\n").unwrap();
        assert!(SitesFile::load(&p).is_err());
    }
}
