//! Contract versions: which `gve:hypervisor` versions this host accepts, and what a
//! component actually implements.

use std::fmt;

use wasmtime::component::Component;
use wasmtime::Engine;

/// The WIT package every plugin implements.
pub const PACKAGE: &str = "gve:hypervisor";

/// Contract versions this host accepts, newest first. A component whose version is
/// semver-compatible with one of these (same major, or same minor for 0.x) is accepted.
pub const ACCEPTED: &[ContractVersion] = &[ContractVersion {
    major: 0,
    minor: 1,
    patch: 3,
}];

/// A version of the `gve:hypervisor` package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContractVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Patch version.
    pub patch: u64,
}

impl ContractVersion {
    /// Parses `gve:hypervisor@X.Y.Z` (or a bare `X.Y.Z`).
    pub fn parse(s: &str) -> Result<ContractVersion, String> {
        let v = s
            .strip_prefix(PACKAGE)
            .and_then(|r| r.strip_prefix('@'))
            .unwrap_or(s);
        let v = semver::Version::parse(v)
            .map_err(|e| format!("contract '{s}' is not of the form {PACKAGE}@X.Y.Z: {e}"))?;
        Ok(ContractVersion {
            major: v.major,
            minor: v.minor,
            patch: v.patch,
        })
    }

    /// True when a host implementing `self` can run a plugin built against `other`.
    pub fn accepts(&self, other: &ContractVersion) -> bool {
        if self.major == 0 {
            other.major == 0 && other.minor == self.minor
        } else {
            other.major == self.major && other.minor <= self.minor
        }
    }
}

impl fmt::Display for ContractVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PACKAGE}@{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Human description of what the host accepts, for error messages.
pub fn accepted_description() -> String {
    ACCEPTED
        .iter()
        .map(|v| {
            if v.major == 0 {
                format!("{PACKAGE}@0.{}.x", v.minor)
            } else {
                format!("{PACKAGE}@{}.x", v.major)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Is `v` accepted by this host?
pub fn is_accepted(v: &ContractVersion) -> bool {
    ACCEPTED.iter().any(|a| a.accepts(v))
}

/// Which contract interfaces a component exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exports {
    /// `gve:hypervisor/driver` is exported.
    pub driver: bool,
    /// `gve:hypervisor/guest` is exported.
    pub guest: bool,
    /// `gve:hypervisor/bulk` is exported (0.1.1): the capability `bulk-copy`.
    pub bulk: bool,
    /// The contract version of those exports.
    pub version: ContractVersion,
}

/// Inspects a compiled component: finds its `gve:hypervisor/*` exports and imports and
/// checks that they are of one accepted version. The error names what the component
/// has and what the host accepts.
pub fn inspect(engine: &Engine, component: &Component) -> Result<Exports, String> {
    let ty = component.component_type();
    let mut versions = Vec::new();
    let (mut driver, mut guest, mut bulk) = (false, false, false);
    let mut other_exports = Vec::new();
    for (name, _) in ty.exports(engine) {
        match split(name) {
            Some((iface, v)) => {
                driver |= iface == "driver";
                guest |= iface == "guest";
                bulk |= iface == "bulk";
                versions.push((name.to_string(), v));
            }
            None => other_exports.push(name.to_string()),
        }
    }
    for (name, _) in ty.imports(engine) {
        if let Some((_, v)) = split(name) {
            versions.push((name.to_string(), v));
        }
    }
    if !driver && !guest {
        let has = if other_exports.is_empty() {
            "nothing".to_string()
        } else {
            other_exports.join(", ")
        };
        let found: Vec<_> = versions.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!(
            "the component exports neither {PACKAGE}/driver nor {PACKAGE}/guest (it exports {has}{}); \
             this host accepts {}",
            if found.is_empty() { String::new() } else { format!("; contract items: {}", found.join(", ")) },
            accepted_description()
        ));
    }
    let mut version = None;
    for (name, v) in &versions {
        let v = ContractVersion::parse(v).map_err(|e| format!("{name}: {e}"))?;
        if !is_accepted(&v) {
            return Err(format!(
                "the component implements {v} ({name}); this host accepts {}",
                accepted_description()
            ));
        }
        match version {
            None => version = Some(v),
            Some(first) if first != v => {
                return Err(format!(
                    "the component mixes contract versions {first} and {v}"
                ))
            }
            Some(_) => {}
        }
    }
    let version =
        version.ok_or_else(|| format!("the component's {PACKAGE} exports carry no version"))?;
    if bulk && !driver {
        return Err(format!(
            "the component exports {PACKAGE}/bulk without {PACKAGE}/driver: bulk copies are staged by a driver"
        ));
    }
    Ok(Exports {
        driver,
        guest,
        bulk,
        version,
    })
}

/// Splits `gve:hypervisor/driver@0.1.0` into (`driver`, `0.1.0`).
fn split(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    rest.split_once('@').or(Some((rest, "")))
}

/// The capability a driver has by exporting `gve:hypervisor/bulk` (not a flag:
/// flags cannot grow within 0.1).
pub const BULK_COPY: &str = "bulk-copy";

/// Names of the capability flags set in `c`.
pub fn capability_names(c: super::bindings::types::Capabilities) -> Vec<String> {
    use super::bindings::types::Capabilities as C;
    let all = [
        (C::CREATE, "create"),
        (C::CLONE, "clone"),
        (C::LINKED_CLONE, "linked-clone"),
        (C::START, "start"),
        (C::SHUTDOWN, "shutdown"),
        (C::SUSPEND, "suspend"),
        (C::RESUME, "resume"),
        (C::MIGRATE, "migrate"),
        (C::LIVE_MIGRATE, "live-migrate"),
        (C::DESTROY, "destroy"),
        (C::TEMPLATES, "templates"),
        (C::GUEST_NATIVE, "guest-native"),
        (C::GUEST_AGENT_CHANNEL, "guest-agent-channel"),
    ];
    all.iter()
        .filter(|(f, _)| c.contains(*f))
        .map(|(_, n)| n.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_rules() {
        let host = ContractVersion::parse("gve:hypervisor@0.1.0").unwrap();
        assert!(host.accepts(&ContractVersion::parse("0.1.7").unwrap()));
        assert!(!host.accepts(&ContractVersion::parse("0.2.0").unwrap()));
        assert!(!host.accepts(&ContractVersion::parse("1.1.0").unwrap()));
        let one = ContractVersion::parse("1.3.0").unwrap();
        assert!(one.accepts(&ContractVersion::parse("1.2.9").unwrap()));
        assert!(!one.accepts(&ContractVersion::parse("1.4.0").unwrap()));
        assert!(ContractVersion::parse("gve:other@0.1.0").is_err());
    }

    #[test]
    fn splits_names() {
        assert_eq!(
            split("gve:hypervisor/driver@0.1.0"),
            Some(("driver", "0.1.0"))
        );
        assert_eq!(split("wasi:cli/run@0.2.0"), None);
        assert!(accepted_description().contains("gve:hypervisor@0.1.x"));
    }
}
