//! The QEMU guest agent protocol (qemu-ga), spoken over the host's guest channel: one
//! JSON command `{"execute": NAME, "arguments": {...}}` in, one reply
//! `{"return": ...}` or `{"error": {"class", "desc"}}` out.
//!
//! Only commands every qemu-ga since 2.5 has are used: guest-exec,
//! guest-exec-status, guest-file-open/read/write/close.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use gve_sdk::prelude::*;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// Most bytes asked of one `guest-file-read`. qemu-ga allows 48 MiB, but libvirt
/// carries the reply as one RPC string of at most 4 MiB ("Unable to encode message
/// payload" above it), and base64 adds a third.
pub const MAX_READ: u32 = 2 << 20;

/// The in-guest agent of one VM behind one endpoint.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The driver endpoint the VM lives behind.
    pub endpoint: String,
    /// The VM (id or name).
    pub vm: String,
    /// Budget of one protocol command, milliseconds.
    pub command_timeout_ms: u32,
}

#[cfg(test)]
impl Agent {
    /// An agent for unit tests (never reaches a guest).
    pub fn for_tests() -> Agent {
        Agent {
            endpoint: "qemu:///system".into(),
            vm: "vm".into(),
            command_timeout_ms: 1000,
        }
    }
}

#[derive(Deserialize)]
struct QgaError {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

/// The status of a process started by `guest-exec`.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case")]
pub struct ExecStatus {
    /// True once the process ended.
    pub exited: bool,
    /// Exit code of a process that exited normally.
    pub exitcode: Option<i32>,
    /// Signal that ended the process.
    pub signal: Option<i32>,
    /// Captured standard output, base64.
    pub out_data: Option<String>,
    /// Captured standard error, base64.
    pub err_data: Option<String>,
    /// qemu-ga cut stdout at its own cap (16 MiB).
    #[serde(default)]
    pub out_truncated: bool,
    /// qemu-ga cut stderr at its own cap (16 MiB).
    #[serde(default)]
    pub err_truncated: bool,
}

/// A `guest-file-read` reply, its base64 read in place where it holds no escape
/// (qemu's JSON may write `/` as `\/`): a reply of up to 2.7 MB copied once less.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ReadReply<'a> {
    #[serde(borrow)]
    buf_b64: std::borrow::Cow<'a, str>,
    eof: bool,
}

/// What one `guest-file-read` returned.
pub struct Read {
    /// Bytes read.
    pub data: Vec<u8>,
    /// End of file reached.
    pub eof: bool,
}

impl Agent {
    /// Sends one command and decodes its `return` value.
    pub fn call<T: DeserializeOwned>(&self, execute: &str, arguments: Value) -> Result<T> {
        self.call_with_timeout(execute, arguments, self.command_timeout_ms)
    }

    /// [`Agent::call`] with an explicit budget.
    pub fn call_with_timeout<T: DeserializeOwned>(
        &self,
        execute: &str,
        arguments: Value,
        timeout_ms: u32,
    ) -> Result<T> {
        let reply = self.send(execute, arguments, timeout_ms)?;
        decode_reply(&self.vm, execute, &reply)
    }

    /// Sends one command; its reply as qemu-ga wrote it.
    fn send(&self, execute: &str, arguments: Value, timeout_ms: u32) -> Result<String> {
        let command = json!({ "execute": execute, "arguments": arguments }).to_string();
        gve_sdk::guest_channel::agent_command(&self.endpoint, &self.vm, &command, timeout_ms)
            .map_err(|e| reclassify(e).context(format_args!("{}: qemu-ga {execute}", self.vm)))
    }

    /// Starts `path` with `args` (stdin from `input`), capturing its output; returns its pid.
    pub fn exec_start(&self, path: &str, args: &[String], input: &[u8]) -> Result<i64> {
        let mut arguments = json!({ "path": path, "arg": args, "capture-output": true });
        if !input.is_empty() {
            arguments["input-data"] = Value::String(B64.encode(input));
        }
        #[derive(Deserialize)]
        struct Pid {
            pid: i64,
        }
        Ok(self.call::<Pid>("guest-exec", arguments)?.pid)
    }

    /// The status of process `pid` started by [`Agent::exec_start`].
    pub fn exec_status(&self, pid: i64) -> Result<ExecStatus> {
        self.call("guest-exec-status", json!({ "pid": pid }))
    }

    /// Opens a guest file; `mode` is an fopen mode ("r", "w", ...). Returns its handle.
    pub fn file_open(&self, path: &str, mode: &str) -> Result<i64> {
        self.call("guest-file-open", json!({ "path": path, "mode": mode }))
    }

    /// Writes all of `data` to an open handle.
    pub fn file_write(&self, handle: i64, data: &[u8]) -> Result<()> {
        #[derive(Deserialize)]
        struct Written {
            count: u64,
        }
        let w: Written = self.call(
            "guest-file-write",
            json!({ "handle": handle, "buf-b64": B64.encode(data) }),
        )?;
        if w.count != data.len() as u64 {
            return Err(Error::backend(format!(
                "{}: qemu-ga guest-file-write wrote {} of {} bytes",
                self.vm,
                w.count,
                data.len()
            )));
        }
        Ok(())
    }

    /// Reads up to `count` bytes (at most [`MAX_READ`]) from an open handle.
    pub fn file_read(&self, handle: i64, count: u32) -> Result<Read> {
        let reply = self.send(
            "guest-file-read",
            json!({ "handle": handle, "count": count.clamp(1, MAX_READ) }),
            self.command_timeout_ms,
        )?;
        let got: ReadReply<'_> = decode_reply(&self.vm, "guest-file-read", &reply)?;
        let data = B64.decode(got.buf_b64.as_bytes()).map_err(|e| {
            Error::backend(format!(
                "{}: qemu-ga guest-file-read sent invalid base64: {e}",
                self.vm
            ))
        })?;
        Ok(Read { data, eof: got.eof })
    }

    /// Closes an open handle.
    pub fn file_close(&self, handle: i64) -> Result<()> {
        self.call::<Value>("guest-file-close", json!({ "handle": handle }))
            .map(|_| ())
    }
}

/// Decodes base64 output of `guest-exec-status`.
pub fn decode_output(vm: &str, data: Option<&str>) -> Result<Vec<u8>> {
    match data {
        None => Ok(Vec::new()),
        Some(s) => B64.decode(s.as_bytes()).map_err(|e| {
            Error::backend(format!(
                "{vm}: qemu-ga guest-exec-status sent invalid base64: {e}"
            ))
        }),
    }
}

/// Turns a qemu-ga reply into the `return` value or a contract error.
fn decode_reply<'a, T: Deserialize<'a>>(vm: &str, execute: &str, reply: &'a str) -> Result<T> {
    #[derive(Deserialize)]
    struct Reply<T> {
        #[serde(rename = "return")]
        ret: Option<T>,
        error: Option<QgaError>,
    }
    let r: Reply<T> = serde_json::from_str(reply).map_err(|e| {
        Error::backend(format!(
            "{vm}: qemu-ga {execute}: unexpected reply ({e}): {}",
            cut(reply, 200)
        ))
    })?;
    match (r.ret, r.error) {
        (_, Some(e)) => Err(classify(&format!(
            "{vm}: qemu-ga {execute}: {} ({})",
            e.desc, e.class
        ))),
        (Some(v), None) => Ok(v),
        (None, None) => Err(Error::backend(format!(
            "{vm}: qemu-ga {execute}: reply has neither return nor error: {}",
            cut(reply, 200)
        ))),
    }
}

/// Maps a guest-side failure message to the contract's error kind. libvirt reports
/// qemu-ga errors as "unable to execute QEMU agent command": the errno text tells
/// what happened.
pub fn classify(message: &str) -> Error {
    classify_by(message, message.to_string())
}

/// [`classify`] deciding by `evidence` (e.g. a command's stderr) alone, carrying
/// `message`.
pub fn classify_by(evidence: &str, message: String) -> Error {
    if evidence.contains("No such file or directory") {
        Error::not_found(message)
    } else if evidence.contains("Permission denied") || evidence.contains("not permitted") {
        Error::denied(message)
    } else if evidence.contains("has been disabled") || evidence.contains("not found: ") {
        Error::unsupported(message)
    } else if evidence.contains("Is a directory") {
        Error::invalid_argument(message)
    } else {
        Error::backend(message)
    }
}

/// The first `max` bytes of `s` (at a char boundary).
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Re-tags an error that came back through libvirt as "unable to execute QEMU agent
/// command" with the kind its errno text implies.
pub fn reclassify(e: Error) -> Error {
    match e {
        Error::Backend(m) => classify(&m),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode_to_values_or_typed_errors() {
        let v: i64 = decode_reply("vm", "guest-file-open", r#"{"return": 1000}"#).unwrap();
        assert_eq!(v, 1000);
        let e = decode_reply::<i64>(
            "vm",
            "guest-file-open",
            r#"{"error": {"class": "GenericError", "desc": "failed to open file '/x' (mode: 'r'): No such file or directory"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind(), "not-found", "{e}");
        assert!(e.message().contains("/x"), "{e}");
        let e = decode_reply::<i64>("vm", "guest-exec", "not json").unwrap_err();
        assert_eq!(e.kind(), "backend");
        let e = decode_reply::<i64>("vm", "guest-exec", "{}").unwrap_err();
        assert!(e.message().contains("neither"), "{e}");
    }

    #[test]
    fn a_read_reply_is_borrowed_unless_escaped() {
        let plain = r#"{"return": {"count": 3, "buf-b64": "YS9i", "eof": true}}"#;
        let r: ReadReply<'_> = decode_reply("vm", "guest-file-read", plain).unwrap();
        assert!(matches!(r.buf_b64, std::borrow::Cow::Borrowed("YS9i")));
        assert!(r.eof);
        // qemu's JSON writer may escape '/', which base64 holds.
        let escaped = r#"{"return": {"count": 3, "buf-b64": "\/\/\/\/", "eof": false}}"#;
        let r: ReadReply<'_> = decode_reply("vm", "guest-file-read", escaped).unwrap();
        assert_eq!(r.buf_b64, "////");
        assert!(!r.eof);
        assert_eq!(B64.decode(r.buf_b64.as_bytes()).unwrap(), [0xff; 3]);
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 10), "abc");
    }
}
