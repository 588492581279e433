//! libvirt calls the host stopped waiting for whose threads still run.
//!
//! A libvirt call runs on a blocking thread; when the plugin's call has no time
//! left for it (or is itself cut off) the host stops waiting and the thread goes on
//! until libvirt answers. A libvirtd that stops answering (frozen, swapped out,
//! wedged on a storage call) would then get one more parked thread per call,
//! without end, and in time take every blocking thread of the agent.
//!
//! [`Stranded`] keeps every call of one plugin from its start to its thread's end,
//! and counts those the host stopped waiting for ("stranded") per URI. Once
//! [`PER_URI`] calls on a URI are stranded it refuses the next call there as
//! `unavailable` at once: the daemon is not answering, and one more thread would
//! not help. Calls long by nature ([`LONG`]: a migration, a managed save, a
//! snapshot, a volume clone, a pool refresh) are waited for within the plugin's
//! long-call budget, not its call budget, and may go on after it legitimately:
//! they count apart ([`LONG_PER_URI`]) and hold back only long calls. Guest-agent
//! commands count apart too ([`COMMANDS_PER_URI`]): libvirt
//! ends each within its own wait, and the agent sends one at a time to a guest
//! (`agent/guest_gate.rs`), so guests whose agents hang hold back only guest-agent
//! commands, and only when very many hang at once, never other calls; a frozen
//! daemon holds back everything. A slow guest is not refused: its commands queue in
//! libvirt as before. A refusal's message carries [`NOT_STARTED`]: it says nothing
//! of a guest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::plugin::bindings::types::Error;

/// Stranded calls (other than guest-agent commands and long calls) on one URI
/// before new calls there are refused.
pub const PER_URI: usize = 8;
/// Stranded guest-agent commands on one URI before new ones there are refused.
pub const COMMANDS_PER_URI: usize = 128;
/// Stranded long calls ([`LONG`]) on one URI before new long calls there are refused.
pub const LONG_PER_URI: usize = 32;
/// Calls that may outlive a plugin's budget as libvirt's normal work.
pub const LONG: [&str; 5] = [
    "migrate-domain",
    "managed-save",
    "create-snapshot",
    "clone-volume",
    "refresh-storage-pool",
];
/// In every refusal's message: the host did not start the call.
pub const NOT_STARTED: &str = "not started until one of them ends";

/// Whether an error of `kind` with `message` (context may precede it) is a
/// refusal of this module's: nothing reached libvirt, nor a guest.
pub fn is_refusal(kind: crate::plugin::ErrorKind, message: &str) -> bool {
    kind == crate::plugin::ErrorKind::Unavailable && message.ends_with(NOT_STARTED)
}

/// What a call is counted under: its URI, and whether it is a guest-agent command.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The libvirt URI.
    pub uri: String,
    /// Whether it is a guest-agent command.
    pub command: bool,
}

impl Key {
    /// The key of a call on `uri`; `command` for a guest-agent command.
    pub fn new(uri: &str, command: bool) -> Key {
        Key {
            uri: uri.to_string(),
            command,
        }
    }
}

/// One call from its start to its thread's end.
#[derive(Debug)]
struct Call {
    id: u64,
    op: &'static str,
    /// When the host stopped waiting for it, if it did.
    stranded: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    calls: HashMap<Key, Vec<Call>>,
}

/// The calls of one plugin version (shared by all its instances).
#[derive(Clone, Default)]
pub struct Stranded(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Stranded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stranded({})", self.count())
    }
}

/// Held by the call's thread: the call ends when it is dropped.
pub struct Claim {
    of: Stranded,
    key: Key,
    id: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut s = self.of.lock();
        if let Some(v) = s.calls.get_mut(&self.key) {
            v.retain(|c| c.id != self.id);
            if v.is_empty() {
                s.calls.remove(&self.key);
            }
        }
    }
}

/// Held by whoever waits for the call: dropped before [`Watch::answered`], it
/// marks the call stranded (a timeout, or the wait itself cut off).
pub struct Watch {
    of: Stranded,
    key: Key,
    id: u64,
    armed: bool,
}

impl Watch {
    /// The call answered in time.
    pub fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut s = self.of.lock();
        if let Some(c) = s
            .calls
            .get_mut(&self.key)
            .and_then(|v| v.iter_mut().find(|c| c.id == self.id))
        {
            c.stranded = Some(Instant::now());
        }
    }
}

impl Stranded {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `op` under `key`, or refuses it while too many calls are stranded
    /// there (see the module). The [`Claim`] goes with the call to its thread.
    pub fn start(&self, key: Key, op: &'static str) -> Result<(Claim, Watch), Error> {
        let mut s = self.lock();
        refuse(&s, &key, op)?;
        s.next += 1;
        let id = s.next;
        s.calls.entry(key.clone()).or_default().push(Call {
            id,
            op,
            stranded: None,
        });
        let claim = Claim {
            of: self.clone(),
            key: key.clone(),
            id,
        };
        let watch = Watch {
            of: self.clone(),
            key,
            id,
            armed: true,
        };
        Ok((claim, watch))
    }

    /// Stranded calls under every key (the long ones too), for tests and diagnostics.
    pub fn count(&self) -> usize {
        let s = self.lock();
        s.calls
            .values()
            .flatten()
            .filter(|c| c.stranded.is_some())
            .count()
    }
}

/// The refusal of `op` under `key`, if the stranded calls say so.
fn refuse(s: &Inner, key: &Key, op: &str) -> Result<(), Error> {
    let long = |c: &&Call| LONG.contains(&c.op);
    // The counted calls on `key`'s URI under the keys `which` picks.
    let stranded = |which: &dyn Fn(&Key) -> bool| -> Vec<&Call> {
        s.calls
            .iter()
            .filter(|(k, _)| k.uri == key.uri && which(k))
            .flat_map(|(_, v)| v.iter())
            .filter(|c| c.stranded.is_some())
            .collect()
    };
    let (long_calls, calls): (Vec<&Call>, Vec<&Call>) =
        stranded(&|k| !k.command).into_iter().partition(long);
    if calls.len() >= PER_URI {
        return Err(refusal(key, op, "calls", &calls));
    }
    if LONG.contains(&op) && long_calls.len() >= LONG_PER_URI {
        return Err(refusal(key, op, "long calls", &long_calls));
    }
    if !key.command {
        return Ok(());
    }
    let commands = stranded(&|k| k.command);
    if commands.len() >= COMMANDS_PER_URI {
        return Err(refusal(key, op, "guest-agent commands", &commands));
    }
    Ok(())
}

fn refusal(key: &Key, op: &str, what: &str, out: &[&Call]) -> Error {
    let oldest = out
        .iter()
        .filter_map(|c| Some((c.stranded?, c.op)))
        .min()
        .map_or(String::new(), |(since, op)| {
            format!(
                ", the oldest ({op}) for {:.1} s",
                since.elapsed().as_secs_f64()
            )
        });
    Error::Unavailable(format!(
        "libvirt at {} has not answered {} {what} the host stopped waiting for{oldest}: \
         {op} {NOT_STARTED}",
        key.uri,
        out.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strand(s: &Stranded, key: &Key, op: &'static str) -> Claim {
        let (claim, watch) = s.start(key.clone(), op).unwrap();
        drop(watch);
        claim
    }

    fn refused(s: &Stranded, key: &Key, op: &'static str) -> String {
        match s.start(key.clone(), op) {
            Err(Error::Unavailable(m)) if is_refusal(crate::plugin::ErrorKind::Unavailable, &m) => {
                m
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("{op} on {key:?} was started"),
        }
    }

    #[test]
    fn stranded_calls_refuse_more_on_their_uri_until_their_threads_end() {
        let s = Stranded::default();
        let a = Key::new("qemu:///a", false);
        // Calls in flight and calls answered count for nothing.
        let busy: Vec<_> = (0..2 * PER_URI)
            .map(|_| s.start(a.clone(), "lookup-domain").unwrap())
            .collect();
        let (claim, watch) = s.start(a.clone(), "lookup-domain").unwrap();
        watch.answered();
        drop(claim);
        assert_eq!(s.count(), 0);
        drop(busy);

        let stuck: Vec<_> = (0..PER_URI)
            .map(|_| strand(&s, &a, "list-domains"))
            .collect();
        assert_eq!(s.count(), PER_URI);
        let m = refused(&s, &a, "open");
        assert!(
            m.contains("qemu:///a") && m.contains("8 calls") && m.contains("list-domains"),
            "{m}"
        );
        // A frozen daemon's calls hold its guest-agent commands back too; not another URI's.
        refused(&s, &Key::new("qemu:///a", true), "qemu-agent-command");
        drop(s.start(Key::new("qemu:///b", false), "open").unwrap());
        drop(stuck);
        assert_eq!(s.count(), 0);
        drop(s.start(a.clone(), "open").unwrap());
    }

    #[test]
    fn long_calls_and_guest_agent_commands_never_hold_other_calls_back() {
        let s = Stranded::default();
        let a = Key::new("qemu:///a", false);
        let long: Vec<_> = LONG
            .iter()
            .cycle()
            .take(LONG_PER_URI)
            .map(|op| strand(&s, &a, op))
            .collect();
        drop(s.start(a.clone(), "list-domains").unwrap());
        // Long calls are bounded among themselves.
        let m = refused(&s, &a, "clone-volume");
        assert!(m.contains("32 long calls"), "{m}");

        // Many hung guests hold back guest-agent commands, not the other calls.
        let commands = Key::new("qemu:///a", true);
        let mut many: Vec<_> = (0..COMMANDS_PER_URI - 1)
            .map(|_| strand(&s, &commands, "qemu-agent-command"))
            .collect();
        drop(s.start(commands.clone(), "qemu-agent-command").unwrap());
        many.push(strand(&s, &commands, "qemu-agent-command"));
        let m = refused(&s, &commands, "qemu-agent-command");
        assert!(m.contains("128 guest-agent commands"), "{m}");
        drop(s.start(a.clone(), "list-domains").unwrap());
        drop((many, long));
        assert_eq!(s.count(), 0);
    }
}
