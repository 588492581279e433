//! The guest's "shell": a handful of built-in commands, enough to exercise every
//! field of `exec-request` and `exec-result`. Nothing here sleeps or blocks.

use gve_sdk::prelude::*;

use crate::fs::{resolve, Fs};

/// What a command produced before the output limit is applied.
#[derive(Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: Option<i32>,
    timed_out: bool,
}

impl Outcome {
    fn exit(code: i32) -> Outcome {
        Outcome {
            exit_code: Some(code),
            ..Outcome::default()
        }
    }

    fn out(stdout: impl Into<Vec<u8>>) -> Outcome {
        Outcome {
            stdout: stdout.into(),
            exit_code: Some(0),
            ..Outcome::default()
        }
    }

    fn fail(code: i32, stderr: impl Into<String>) -> Outcome {
        Outcome {
            stderr: stderr.into().into_bytes(),
            exit_code: Some(code),
            ..Outcome::default()
        }
    }
}

/// The environment every command starts with, before the request's variables.
const BASE_ENV: &[(&str, &str)] = &[("PATH", "/usr/local/bin:/usr/bin:/bin"), ("HOME", "/root")];

/// Runs `request` in a guest whose files are `fs`.
pub fn run(request: &ExecRequest, fs: &Fs) -> Result<ExecResult> {
    if request.argv.is_empty() {
        return Err(Error::invalid_argument("exec: argv must not be empty"));
    }
    let outcome = command(&request.argv, request, fs);
    let limit = request.output_limit as usize;
    let (stdout, stdout_truncated) = cap(outcome.stdout, limit);
    let (stderr, stderr_truncated) = cap(outcome.stderr, limit);
    Ok(ExecResult {
        exit_code: outcome.exit_code,
        signal: None,
        timed_out: outcome.timed_out,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
    })
}

fn cap(mut bytes: Vec<u8>, limit: usize) -> (Vec<u8>, bool) {
    if bytes.len() > limit {
        bytes.truncate(limit);
        (bytes, true)
    } else {
        (bytes, false)
    }
}

fn command(argv: &[String], request: &ExecRequest, fs: &Fs) -> Outcome {
    let program = argv[0].rsplit('/').next().unwrap_or_default();
    let args = &argv[1..];
    let cwd = request.cwd.as_deref().unwrap_or("/");
    match program {
        "true" => Outcome::exit(0),
        "false" => Outcome::exit(1),
        "echo" => echo(args),
        "cat" => cat(args, request, fs, cwd),
        "env" => {
            let mut vars: Vec<(String, String)> = BASE_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            for e in &request.env {
                vars.retain(|(k, _)| *k != e.name);
                vars.push((e.name.clone(), e.value.clone()));
            }
            Outcome::out(
                vars.iter()
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect::<String>(),
            )
        }
        "pwd" => Outcome::out(format!("{cwd}\n")),
        "uname" if args.iter().any(|a| a == "-a") => {
            Outcome::out("Linux memory 6.1.0 gve-memory x86_64\n")
        }
        "uname" => Outcome::out("Linux\n"),
        "sleep" => sleep(args, request.timeout_ms),
        "bytes" => match args.first().map(|n| n.parse::<usize>()) {
            Some(Ok(n)) => Outcome::out((0..n).map(|i| (i % 256) as u8).collect::<Vec<u8>>()),
            _ => Outcome::fail(2, "usage: bytes N\n"),
        },
        "sh" => sh(args, request, fs),
        other => Outcome::fail(127, format!("sh: {other}: not found\n")),
    }
}

fn echo(args: &[String]) -> Outcome {
    let (newline, words) = match args.first().map(String::as_str) {
        Some("-n") => (false, &args[1..]),
        _ => (true, args),
    };
    let mut s = words.join(" ");
    if newline {
        s.push('\n');
    }
    Outcome::out(s)
}

fn cat(args: &[String], request: &ExecRequest, fs: &Fs, cwd: &str) -> Outcome {
    if args.is_empty() || args == ["-"] {
        return Outcome::out(request.stdin.clone());
    }
    let mut out = Outcome::exit(0);
    for a in args {
        if a == "-" {
            out.stdout.extend_from_slice(&request.stdin);
            continue;
        }
        let path = resolve(cwd, a);
        match fs.file(&path) {
            Ok(f) => out.stdout.extend_from_slice(&f.data),
            Err(Error::InvalidArgument(_)) => {
                out.stderr
                    .extend(format!("cat: {a}: Is a directory\n").bytes());
                out.exit_code = Some(1);
            }
            Err(_) => {
                out.stderr
                    .extend(format!("cat: {a}: No such file or directory\n").bytes());
                out.exit_code = Some(1);
            }
        }
    }
    out
}

/// `sleep N` never sleeps: it either finishes at once or reports the timeout it
/// would have hit.
fn sleep(args: &[String], timeout_ms: u32) -> Outcome {
    let Some(Ok(secs)) = args.first().map(|s| s.parse::<f64>()) else {
        return Outcome::fail(1, "sleep: missing or invalid operand\n");
    };
    if secs < 0.0 {
        return Outcome::fail(1, format!("sleep: invalid time interval '{}'\n", args[0]));
    }
    if secs * 1000.0 > f64::from(timeout_ms) {
        Outcome {
            exit_code: None,
            timed_out: true,
            ..Outcome::default()
        }
    } else {
        Outcome::exit(0)
    }
}

/// `sh -c SCRIPT`: `exit N`, or one command split on whitespace.
fn sh(args: &[String], request: &ExecRequest, fs: &Fs) -> Outcome {
    let script = match args {
        [flag, script, ..] if flag == "-c" => script.trim(),
        _ => return Outcome::fail(2, "sh: only `sh -c SCRIPT` is supported\n"),
    };
    let words: Vec<String> = script.split_whitespace().map(str::to_string).collect();
    match words.as_slice() {
        [] => Outcome::exit(0),
        [exit] if exit == "exit" => Outcome::exit(0),
        [exit, code] if exit == "exit" => match code.parse::<i32>() {
            Ok(n) => Outcome::exit(n & 0xff),
            Err(_) => Outcome::fail(2, format!("sh: exit: Illegal number: {code}\n")),
        },
        _ => command(&words, request, fs),
    }
}
