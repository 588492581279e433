//! libvirt calls the host stopped waiting for whose threads still run.
//!
//! A libvirt call runs on a blocking thread; when the plugin's call has no time
//! left for it the host answers `timeout` and the thread goes on until libvirt
//! answers. A libvirtd that stops answering (frozen, swapped out, wedged on a
//! storage call) would then get one more parked thread per call, without end, and
//! in time take every blocking thread of the agent. [`Stranded`] counts those
//! threads per URI of one plugin, and per domain for guest-agent commands, and
//! refuses a new call as `unavailable` while [`PER_URI`] calls (or [`PER_DOMAIN`]
//! commands to its domain, or [`TOTAL`] in all) are still out: the daemon is not
//! answering, and one more thread would not help. A command to a guest whose agent
//! hangs is ended by libvirt itself within its own wait, so a hung guest holds back
//! only its own domain's commands, never other domains' or other calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::plugin::bindings::types::Error;

/// Calls other than guest-agent commands out on one URI before new ones are refused.
pub const PER_URI: usize = 8;
/// Guest-agent commands out to one domain before new ones to it are refused.
pub const PER_DOMAIN: usize = 4;
/// Calls of every kind out on one URI before any new one is refused.
pub const TOTAL: usize = 64;

/// What a call is counted under: its URI, and its domain for a guest-agent command.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The libvirt URI.
    pub uri: String,
    /// The domain of a guest-agent command; `None` for every other call.
    pub domain: Option<String>,
}

/// One stranded call: what it was and since when it has been out.
#[derive(Debug)]
struct Out {
    id: u64,
    op: &'static str,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    next: u64,
    out: HashMap<Key, Vec<Out>>,
}

/// The stranded calls of one plugin (shared by all its instances).
#[derive(Clone, Default)]
pub struct Stranded(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Stranded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stranded({})", self.count())
    }
}

/// Counts one stranded call until dropped (when its thread has ended).
pub struct Mark {
    of: Stranded,
    key: Key,
    id: u64,
}

impl Drop for Mark {
    fn drop(&mut self) {
        let mut s = self.of.lock();
        if let Some(v) = s.out.get_mut(&self.key) {
            v.retain(|o| o.id != self.id);
            if v.is_empty() {
                s.out.remove(&self.key);
            }
        }
    }
}

impl Stranded {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `op` under `key` while too many calls are out there (see the module).
    pub fn admit(&self, key: &Key, op: &str) -> Result<(), Error> {
        let s = self.lock();
        let on_uri = s.out.iter().filter(|(k, _)| k.uri == key.uri);
        let (mut total, mut calls) = (0, 0);
        let mut oldest: Option<&Out> = None;
        for (k, v) in on_uri {
            total += v.len();
            if k.domain.is_none() {
                calls += v.len();
            }
            if let Some(o) = v.iter().min_by_key(|o| o.since) {
                if oldest.is_none_or(|p| o.since < p.since) {
                    oldest = Some(o);
                }
            }
        }
        let mine = s.out.get(key).map_or(0, Vec::len);
        let why = if total >= TOTAL {
            format!("{total} calls")
        } else if calls >= PER_URI {
            format!("{calls} calls")
        } else if key.domain.is_some() && mine >= PER_DOMAIN {
            let oldest = s
                .out
                .get(key)
                .and_then(|v| v.iter().min_by_key(|o| o.since));
            return Err(refusal(
                key,
                op,
                &format!("{mine} guest-agent commands"),
                oldest,
            ));
        } else {
            return Ok(());
        };
        Err(refusal(key, op, &why, oldest))
    }

    /// Counts a call under `key` that the host stopped waiting for, until the
    /// returned mark is dropped.
    pub fn mark(&self, key: Key, op: &'static str) -> Mark {
        let mut s = self.lock();
        s.next += 1;
        let id = s.next;
        s.out.entry(key.clone()).or_default().push(Out {
            id,
            op,
            since: Instant::now(),
        });
        Mark {
            of: self.clone(),
            key,
            id,
        }
    }

    /// Calls out under every key, for tests and diagnostics.
    pub fn count(&self) -> usize {
        self.lock().out.values().map(Vec::len).sum()
    }
}

fn refusal(key: &Key, op: &str, what: &str, oldest: Option<&Out>) -> Error {
    let whom = match &key.domain {
        Some(d) => format!("libvirt at {} (domain {d})", key.uri),
        None => format!("libvirt at {}", key.uri),
    };
    let oldest = oldest.map_or(String::new(), |o| {
        format!(
            ", the oldest a {} out for {:.1} s",
            o.op,
            o.since.elapsed().as_secs_f64()
        )
    });
    Error::Unavailable(format!(
        "{whom} has not answered {what} the host stopped waiting for{oldest}: \
         {op} not started until one ends"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str, domain: Option<&str>) -> Key {
        Key {
            uri: uri.into(),
            domain: domain.map(Into::into),
        }
    }

    #[test]
    fn calls_are_refused_per_uri_commands_per_domain_and_freed_as_they_end() {
        let s = Stranded::default();
        let a = key("qemu:///a", None);
        let marks: Vec<_> = (0..PER_URI)
            .map(|_| s.mark(a.clone(), "list-domains"))
            .collect();
        let e = s.admit(&a, "lookup-domain").unwrap_err();
        let Error::Unavailable(m) = e else {
            panic!("{e:?}")
        };
        assert!(
            m.contains("qemu:///a") && m.contains("8 calls") && m.contains("list-domains"),
            "{m}"
        );
        // Another URI and guest-agent commands on this one go on.
        s.admit(&key("qemu:///b", None), "open").unwrap();
        // A frozen daemon's calls hold its guest-agent commands back too.
        assert!(s
            .admit(&key("qemu:///a", Some("vm1")), "qemu-agent-command")
            .is_err());
        drop(marks);
        assert_eq!(s.count(), 0);
        s.admit(&a, "lookup-domain").unwrap();

        // A hung guest agent holds back only its own domain.
        let vm1 = key("qemu:///a", Some("vm1"));
        let cmds: Vec<_> = (0..PER_DOMAIN)
            .map(|_| s.mark(vm1.clone(), "qemu-agent-command"))
            .collect();
        assert!(s.admit(&vm1, "qemu-agent-command").is_err());
        s.admit(&key("qemu:///a", Some("vm2")), "qemu-agent-command")
            .unwrap();
        s.admit(&a, "list-domains").unwrap();
        drop(cmds);
        s.admit(&vm1, "qemu-agent-command").unwrap();

        // Every kind together is bounded too.
        let many: Vec<_> = (0..TOTAL)
            .map(|i| {
                s.mark(
                    key("qemu:///a", Some(&format!("vm{}", i % 20))),
                    "qemu-agent-command",
                )
            })
            .collect();
        assert!(s.admit(&a, "list-domains").is_err());
        assert!(s
            .admit(&key("qemu:///a", Some("vm99")), "qemu-agent-command")
            .is_err());
        s.admit(&key("qemu:///b", None), "open").unwrap();
        drop(many);
        assert_eq!(s.count(), 0);
    }
}
