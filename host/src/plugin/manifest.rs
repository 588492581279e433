//! The plugin manifest (`gve-plugin.toml`): what a plugin is and what it asks for.
//!
//! A plugin bundle is a directory holding the manifest and the component it names.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::contract::ContractVersion;
use super::error::{PluginError, Result};

/// File name of a manifest inside a bundle.
pub const MANIFEST_FILE: &str = "gve-plugin.toml";

/// Host capabilities a plugin asks for. The operator's grants decide what it gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Requests {
    /// Outgoing HTTP (wasi:http) to hosts the operator allows.
    pub http: bool,
    /// libvirt connections to URIs the operator allows.
    pub libvirt: bool,
    /// The in-guest agent channel of VMs, through their drivers.
    pub guest_channel: bool,
    /// Directories the operator preopens.
    pub filesystem: bool,
}

/// Limits the plugin declares about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeclaredLimits {
    /// Instances per session the plugin tolerates at once; 1 means it keeps state
    /// in its own memory and calls on one session must be serialized.
    pub concurrency: u32,
    /// What ending a guest command at its timeout and reading its output take the
    /// plugin, milliseconds (default 1000, at most 60000): the agent allows an exec
    /// or provision timeout of at most the call budget less this.
    pub exec_margin_ms: u64,
}

/// The largest `exec-margin-ms` a manifest may declare.
pub const MAX_EXEC_MARGIN_MS: u64 = 60_000;

impl Default for DeclaredLimits {
    fn default() -> Self {
        DeclaredLimits {
            concurrency: 1,
            exec_margin_ms: 1_000,
        }
    }
}

/// A parsed and validated plugin manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Plugin name: lower-case letters, digits and dashes.
    pub name: String,
    /// Plugin version (semver).
    pub version: semver::Version,
    /// Contract the plugin implements, `gve:hypervisor@X.Y.Z`.
    pub contract: String,
    /// Component file name inside the bundle.
    pub component: String,
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// Capabilities asked for.
    #[serde(default)]
    pub requests: Requests,
    /// Limits the plugin declares.
    #[serde(default)]
    pub limits: DeclaredLimits,
}

/// A manifest together with where its bundle is.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The manifest.
    pub manifest: Manifest,
    /// The manifest's path.
    pub manifest_path: PathBuf,
    /// Absolute path of the component file.
    pub component_path: PathBuf,
    /// The contract version the manifest names.
    pub contract: ContractVersion,
}

impl Bundle {
    /// Reads a bundle from a directory (or from the path of its manifest file).
    pub fn read(path: &Path) -> Result<Bundle> {
        let manifest_path = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&manifest_path).map_err(|source| PluginError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = Manifest::parse(&text).map_err(|message| PluginError::Manifest {
            path: manifest_path.clone(),
            message,
        })?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        // The component lies inside the bundle: a plain relative path, and (symlinks
        // resolved) still under the bundle's directory, so a manifest cannot point a
        // load at a file elsewhere on the host.
        let rel = Path::new(&manifest.component);
        let plain = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        let inside = plain
            && match (
                std::fs::canonicalize(dir),
                std::fs::canonicalize(dir.join(rel)),
            ) {
                (Ok(d), Ok(c)) => c.starts_with(&d),
                // Missing: reported when it is read, with its path.
                (Ok(_), Err(_)) => true,
                (Err(_), _) => false,
            };
        if !inside {
            return Err(PluginError::Manifest {
                path: manifest_path.clone(),
                message: format!(
                    "component '{}' must be a file inside the bundle directory",
                    manifest.component
                ),
            });
        }
        let component_path = dir.join(&manifest.component);
        let component_path =
            std::path::absolute(&component_path).map_err(|source| PluginError::Io {
                path: component_path.clone(),
                source,
            })?;
        let contract = ContractVersion::parse(&manifest.contract).map_err(|message| {
            PluginError::Manifest {
                path: manifest_path.clone(),
                message,
            }
        })?;
        Ok(Bundle {
            manifest,
            manifest_path,
            component_path,
            contract,
        })
    }
}

impl Manifest {
    /// Parses and validates manifest text; the error says which field is wrong.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        validate_name(&self.name)?;
        if self.component.is_empty()
            || self.component.contains('/')
            || self.component.contains('\\')
            || self.component.starts_with('.')
        {
            return Err(format!(
                "component '{}' must be a plain file name inside the bundle directory",
                self.component
            ));
        }
        if self.limits.concurrency == 0 || self.limits.concurrency > 256 {
            return Err(format!(
                "limits.concurrency must be between 1 and 256, not {}",
                self.limits.concurrency
            ));
        }
        if self.limits.exec_margin_ms > MAX_EXEC_MARGIN_MS {
            return Err(format!(
                "limits.exec-margin-ms must be at most {MAX_EXEC_MARGIN_MS}, not {}",
                self.limits.exec_margin_ms
            ));
        }
        Ok(())
    }
}

/// Checks a plugin name: 1–64 characters of `a-z`, `0-9` and `-`, starting with a letter.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name '{name}' must be 1-64 characters of a-z, 0-9 and '-', starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "memory"
version = "0.1.0"
contract = "gve:hypervisor@0.1.0"
component = "memory.wasm"
[requests]
http = true
[limits]
concurrency = 4
"#;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.name, "memory");
        assert!(m.requests.http && !m.requests.libvirt);
        assert_eq!(m.limits.concurrency, 4);
    }

    #[test]
    fn refuses_bad_fields_with_their_names() {
        let e = Manifest::parse(&GOOD.replace("memory.wasm", "../x.wasm")).unwrap_err();
        assert!(e.contains("plain file name"), "{e}");
        let e =
            Manifest::parse(&GOOD.replace("name = \"memory\"", "name = \"Mem ory\"")).unwrap_err();
        assert!(e.contains("a-z"), "{e}");
        let e = Manifest::parse(&GOOD.replace("http = true", "htp = true")).unwrap_err();
        assert!(e.contains("htp"), "{e}");
        let e = Manifest::parse(&GOOD.replace("0.1.0\"\ncontract", "one\"\ncontract")).unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = Manifest::parse(&GOOD.replace("concurrency = 4", "concurrency = 0")).unwrap_err();
        assert!(e.contains("concurrency"), "{e}");
        assert_eq!(Manifest::parse(GOOD).unwrap().limits.exec_margin_ms, 1_000);
        let slow = Manifest::parse(
            &GOOD.replace("concurrency = 4", "concurrency = 4\nexec-margin-ms = 3000"),
        )
        .unwrap();
        assert_eq!(slow.limits.exec_margin_ms, 3_000);
        let e = Manifest::parse(&GOOD.replace("concurrency = 4", "exec-margin-ms = 60001"))
            .unwrap_err();
        assert!(e.contains("exec-margin-ms"), "{e}");
    }
}
