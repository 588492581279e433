//! The bodies of VM jobs, checked when a job is submitted (types, unknown fields,
//! ranges, names safe in paths and headers), so an accepted job fails only for
//! what happens while it runs or for what only the agent knows (a `timeout-ms`
//! above its guest plugin's call budget, a bundle it does not have).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::model::JobKind;
use crate::api::{in_range, parse_json, ApiError};

/// `start`, `suspend`, `resume`, `release`: no fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// `shutdown`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read by the agent; parsed here to check it
struct Shutdown {
    #[serde(default)]
    force: bool,
}

/// `clone`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clone {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    linked: bool,
}

/// `migrate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Migrate {
    to: String,
    #[serde(default)]
    #[allow(dead_code)]
    live: Option<bool>,
}

/// `provision`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Provision {
    bundle: String,
    #[serde(default)]
    timeout_ms: Option<u32>,
}

/// Most arguments of a command.
pub const MAX_ARGV: usize = 4096;
/// Most environment variables of a command.
pub const MAX_ENV: usize = 256;
/// Longest budget a command may ask, ms (the agent lowers the ceiling to its
/// guest plugin's call budget).
pub const MAX_EXEC_TIMEOUT_MS: u32 = 3_600_000;
/// Most output kept of stdout and of stderr each, bytes.
pub const MAX_OUTPUT_LIMIT: u32 = 16 << 20;

/// Checks a job body for `kind`. Returns the body to record (the parsed JSON as
/// given).
pub fn check(kind: JobKind, body: &[u8]) -> Result<Value, ApiError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let value: Value = parse_json(text)?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    match kind {
        JobKind::Start | JobKind::Suspend | JobKind::Resume | JobKind::Release => {
            parse_json::<NoFields>(text)?;
        }
        JobKind::Shutdown => {
            parse_json::<Shutdown>(text)?;
        }
        JobKind::Clone => {
            let b: Clone = parse_json(text)?;
            super::auth::validate_id("clone name", &b.name)?;
        }
        JobKind::Migrate => {
            let b: Migrate = parse_json(text)?;
            super::auth::validate_id("to", &b.to)?;
        }
        JobKind::Provision => {
            let b: Provision = parse_json(text)?;
            super::auth::validate_id("bundle", &b.bundle)?;
            if let Some(t) = b.timeout_ms {
                in_range("timeout-ms", t, 1, MAX_EXEC_TIMEOUT_MS)?;
            }
        }
        JobKind::Exec => check_exec(text)?,
        JobKind::Request | JobKind::Expire | JobKind::CopyIn | JobKind::CopyOut => {
            return Err(ApiError::bad_request(format!(
                "{} jobs are not submitted with an action body",
                kind.as_str()
            )))
        }
    }
    Ok(value)
}

fn check_exec(text: &[u8]) -> Result<(), ApiError> {
    let b: crate::agent::guest::ExecBody = parse_json(text)?;
    if b.argv.is_empty() || b.argv[0].is_empty() {
        return Err(ApiError::bad_request("argv must name a program"));
    }
    in_range("argv (entries)", b.argv.len(), 1, MAX_ARGV)?;
    if b.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request(
            "argv: an argument contains a NUL byte",
        ));
    }
    check_env(&b.env)?;
    if let Some(cwd) = &b.cwd {
        if cwd.is_empty() || cwd.len() > 4096 || cwd.contains('\0') || !cwd.starts_with('/') {
            return Err(ApiError::bad_request(
                "cwd must be an absolute path of at most 4096 bytes without NUL",
            ));
        }
    }
    if let Some(t) = b.timeout_ms {
        in_range("timeout-ms", t, 1, MAX_EXEC_TIMEOUT_MS)?;
    }
    if let Some(l) = b.output_limit {
        in_range("output-limit", l, 0, MAX_OUTPUT_LIMIT)?;
    }
    if let Some(s) = &b.stdin_b64 {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| ApiError::bad_request(format!("stdin-b64 is not base64: {e}")))?;
    }
    Ok(())
}

/// Environment variable names as POSIX shells accept them.
fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    in_range("env (variables)", env.len(), 0, MAX_ENV)?;
    for (k, v) in env {
        let name_ok = !k.is_empty()
            && k.len() <= 256
            && k.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return Err(ApiError::bad_request(format!(
                "env: '{k}' is not a variable name ([A-Za-z_][A-Za-z0-9_]*, at most 256)"
            )));
        }
        if v.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "env: the value of {k} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_before_a_job_exists() {
        let bad = [
            (JobKind::Exec, r#"{"argv":["true"],"env":5}"#, "env"),
            (JobKind::Exec, r#"{"argv":[]}"#, "argv"),
            (
                JobKind::Exec,
                r#"{"argv":["x"],"timeout-ms":0}"#,
                "timeout-ms",
            ),
            (JobKind::Exec, r#"{"argv":["x"],"bogus":1}"#, "bogus"),
            (JobKind::Exec, r#"{"argv":["x"],"env":{"A B":"1"}}"#, "env"),
            (JobKind::Provision, r#"{"bundle":"a\nb"}"#, "bundle"),
            (JobKind::Clone, r#"{"name":"../x"}"#, "clone name"),
            (JobKind::Migrate, r#"{}"#, "to"),
            (JobKind::Start, r#"{"force":true}"#, "force"),
            (JobKind::Shutdown, r#"{"force":"yes"}"#, "force"),
            (JobKind::Start, r#"[1]"#, "object"),
        ];
        for (kind, body, field) in bad {
            let e = check(kind, body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{body}: {e}");
            assert!(e.message.contains(field), "{body}: {e}");
        }
        for (kind, body) in [
            (JobKind::Exec, r#"{"argv":["echo","hi"],"env":{"X_1":"v"}}"#),
            (JobKind::Start, ""),
            (JobKind::Shutdown, r#"{"force":true}"#),
            (JobKind::Provision, r#"{"bundle":"gridsam"}"#),
        ] {
            check(kind, body.as_bytes()).unwrap();
        }
    }
}
