//! Errors of the plugin host: loading, sandbox violations, and the contract's own errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The contract's error kinds (`gve:hypervisor/types.error`), as plain Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// The object exists already.
    AlreadyExists,
    /// An argument is malformed or out of range.
    InvalidArgument,
    /// The object's state does not allow the operation.
    InvalidState,
    /// The driver does not implement the operation.
    Unsupported,
    /// Policy or permissions refused the call.
    Denied,
    /// The operation ran out of time.
    Timeout,
    /// The hypervisor or agent cannot be reached.
    Unavailable,
    /// Any other backend failure.
    Backend,
}

impl ErrorKind {
    /// The contract's name for this kind (`not-found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::InvalidState => "invalid-state",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Denied => "denied",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Backend => "backend",
        }
    }

    /// The kind named `s` (as [`ErrorKind::as_str`] writes it).
    pub fn parse(s: &str) -> Option<ErrorKind> {
        use ErrorKind::*;
        [
            NotFound,
            AlreadyExists,
            InvalidArgument,
            InvalidState,
            Unsupported,
            Denied,
            Timeout,
            Unavailable,
            Backend,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error a driver returned through the contract: its kind and its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({kind})")]
pub struct DriverError {
    /// The contract's error kind.
    pub kind: ErrorKind,
    /// The driver's message.
    pub message: String,
}

impl DriverError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DriverError {
            kind,
            message: message.into(),
        }
    }

    /// Whether the host refused to start the call behind this error because libvirt
    /// has not answered earlier ones (nothing reached libvirt, nor a guest).
    pub fn not_started(&self) -> bool {
        super::caps::libvirt_stranded::is_refusal(self.kind, &self.message)
    }

    /// The same error with its message cut to the host's limit (a plugin's message is
    /// stored in operation records and shown to users).
    pub fn bounded(self) -> Self {
        DriverError {
            kind: self.kind,
            message: super::answers::bounded_message(self.message),
        }
    }
}

/// Everything that can go wrong in the plugin host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// No plugin of that name is loaded.
    #[error("plugin '{0}' is not loaded")]
    NotLoaded(String),
    /// A session's plugin is not loaded now (it was unloaded); its calls fail until a
    /// version of it is loaded again, then work without reopening the session.
    #[error("plugin '{0}' is not loaded now; its sessions work again once it is loaded")]
    Unloaded(String),
    /// A plugin of that name is loaded already (use replace).
    #[error("plugin '{0}' is already loaded; use replace to swap its version")]
    AlreadyLoaded(String),
    /// The bundle could not be read.
    #[error("plugin bundle {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed or inconsistent with the component.
    #[error("plugin manifest {path}: {message}")]
    Manifest {
        /// Manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The component implements a contract version or world this host does not accept.
    #[error("plugin '{plugin}': {message}")]
    Contract {
        /// Plugin name.
        plugin: String,
        /// What the component has and what the host accepts.
        message: String,
    },
    /// Compiling, caching or instantiating the component failed.
    #[error("plugin '{plugin}': cannot {action}: {message}")]
    Runtime {
        /// Plugin name.
        plugin: String,
        /// What the host was doing (compile, instantiate, ...).
        action: &'static str,
        /// The runtime's message.
        message: String,
    },
    /// The operator's configuration is invalid.
    #[error("plugin configuration: {0}")]
    Config(String),
    /// The call ran past its wall-clock budget and was stopped.
    #[error(
        "plugin '{plugin}': {op} stopped after running {ran:.1?}, past its {budget:?} \
         budget (`call-timeout-ms`; waits on long calls, within `long-call-timeout-ms`, \
         not counted)"
    )]
    Deadline {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// The budget it had.
        budget: Duration,
        /// How long it ran, long waits included.
        ran: Duration,
    },
    /// Every instance of the lane a call needed stayed busy for the call's budget.
    #[error("plugin '{plugin}': no instance free for {op} within {waited:?}: all of its {lane} instances are busy")]
    Busy {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// `control` or `guest-agent`.
        lane: &'static str,
        /// How long the call waited.
        waited: Duration,
    },
    /// The plugin tried to grow its memory past its cap.
    #[error("plugin '{plugin}': {op} refused: memory cap of {cap_mib} MiB exceeded (asked for {asked_mib} MiB)")]
    MemoryCap {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// The cap.
        cap_mib: u64,
        /// What the plugin asked for.
        asked_mib: u64,
    },
    /// The plugin tried to hold more of a host resource than its budget.
    #[error("plugin '{plugin}': {op} stopped: it exceeded its budget of {limit} {what}")]
    Budget {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// What it ran out of (`open files`, ...).
        what: &'static str,
        /// The budget.
        limit: u64,
    },
    /// The plugin returned something the host does not take.
    #[error("plugin '{plugin}': {op} returned an answer the host refuses: {problem}")]
    Answer {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The plugin panicked.
    #[error("plugin '{plugin}': {op} failed: the plugin panicked")]
    Panic {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
    },
    /// The plugin trapped for another reason.
    #[error("plugin '{plugin}': {op} failed: trap: {message}")]
    Trap {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// The trap's description.
        message: String,
    },
    /// The plugin does not export the interface or declare the capability the call needs.
    #[error("plugin '{plugin}': {op} is not supported by this plugin ({reason})")]
    NotSupported {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The host refused an argument before calling the plugin.
    #[error("plugin '{plugin}': {op} refused before the call: {problem}")]
    Argument {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// What is wrong with the argument.
        problem: String,
    },
    /// The driver returned one of the contract's errors.
    #[error("plugin '{plugin}': {op}: {error}")]
    Driver {
        /// Plugin name.
        plugin: String,
        /// Contract operation.
        op: &'static str,
        /// The driver's error.
        error: DriverError,
    },
}

impl PluginError {
    /// A runtime failure of `plugin` while doing `action` (`{e:#}` keeps the cause chain).
    pub fn runtime(
        plugin: impl Into<String>,
        action: &'static str,
        e: impl std::fmt::Display,
    ) -> PluginError {
        PluginError::Runtime {
            plugin: plugin.into(),
            action,
            message: format!("{e:#}"),
        }
    }

    /// The contract error kind this error corresponds to, for callers that map errors
    /// to protocol status codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PluginError::NotLoaded(_) => ErrorKind::NotFound,
            PluginError::Unloaded(_) => ErrorKind::Unavailable,
            PluginError::AlreadyLoaded(_) => ErrorKind::AlreadyExists,
            PluginError::Io { .. }
            | PluginError::Manifest { .. }
            | PluginError::Contract { .. }
            | PluginError::Config(_)
            | PluginError::Argument { .. } => ErrorKind::InvalidArgument,
            PluginError::Runtime { .. }
            | PluginError::Panic { .. }
            | PluginError::Trap { .. }
            | PluginError::Answer { .. } => ErrorKind::Backend,
            PluginError::Deadline { .. } => ErrorKind::Timeout,
            PluginError::Busy { .. } => ErrorKind::Unavailable,
            PluginError::MemoryCap { .. } | PluginError::Budget { .. } => ErrorKind::Denied,
            PluginError::NotSupported { .. } => ErrorKind::Unsupported,
            PluginError::Driver { error, .. } => error.kind,
        }
    }

    /// The driver's own error, when the plugin returned one.
    pub fn driver_error(&self) -> Option<&DriverError> {
        match self {
            PluginError::Driver { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Result alias of the plugin host.
pub type Result<T, E = PluginError> = std::result::Result<T, E>;
