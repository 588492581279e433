//! The contract's one error type, with constructors and conversions.
//!
//! [`Error`] is the WIT variant `types.error`: wit-bindgen is told (`with`) to use
//! this hand-written enum instead of generating one, so it can carry a readable
//! `Display`, `PartialEq` and conversions. Its cases and their order must match the
//! WIT variant exactly: the generated lifting and lowering code relies on them.

use core::fmt;

/// The one error type of the contract; every case carries a human-readable message
/// saying which object was involved and why the call failed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Error {
    /// The VM, template, host or file named in the call does not exist.
    NotFound(String),
    /// An object with that name or id exists already.
    AlreadyExists(String),
    /// An argument is malformed or out of range.
    InvalidArgument(String),
    /// The object is in a state in which the operation is not allowed.
    InvalidState(String),
    /// The driver or hypervisor does not implement the operation.
    Unsupported(String),
    /// The host's policy or the hypervisor's permissions refused the call.
    Denied(String),
    /// The operation did not finish within its time budget.
    Timeout(String),
    /// The hypervisor, endpoint or in-guest agent cannot be reached right now.
    Unavailable(String),
    /// Any other failure reported by the hypervisor, with its own message.
    Backend(String),
}

/// `Result` with the contract's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

impl Error {
    /// A `not-found` error.
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::NotFound(message.into())
    }

    /// An `already-exists` error.
    pub fn already_exists(message: impl Into<String>) -> Error {
        Error::AlreadyExists(message.into())
    }

    /// An `invalid-argument` error.
    pub fn invalid_argument(message: impl Into<String>) -> Error {
        Error::InvalidArgument(message.into())
    }

    /// An `invalid-state` error.
    pub fn invalid_state(message: impl Into<String>) -> Error {
        Error::InvalidState(message.into())
    }

    /// An `unsupported` error.
    pub fn unsupported(message: impl Into<String>) -> Error {
        Error::Unsupported(message.into())
    }

    /// The `unsupported` error the SDK's default trait methods return for `op`
    /// (the WIT name of the operation, e.g. `"migrate"`).
    pub fn not_implemented(op: &str) -> Error {
        Error::Unsupported(format!("{op} is not implemented by this driver"))
    }

    /// A `denied` error.
    pub fn denied(message: impl Into<String>) -> Error {
        Error::Denied(message.into())
    }

    /// A `timeout` error.
    pub fn timeout(message: impl Into<String>) -> Error {
        Error::Timeout(message.into())
    }

    /// An `unavailable` error.
    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::Unavailable(message.into())
    }

    /// A `backend` error.
    pub fn backend(message: impl Into<String>) -> Error {
        Error::Backend(message.into())
    }

    /// The WIT name of the error's case (`not-found`, `invalid-state`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not-found",
            Error::AlreadyExists(_) => "already-exists",
            Error::InvalidArgument(_) => "invalid-argument",
            Error::InvalidState(_) => "invalid-state",
            Error::Unsupported(_) => "unsupported",
            Error::Denied(_) => "denied",
            Error::Timeout(_) => "timeout",
            Error::Unavailable(_) => "unavailable",
            Error::Backend(_) => "backend",
        }
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::InvalidArgument(m)
            | Error::InvalidState(m)
            | Error::Unsupported(m)
            | Error::Denied(m)
            | Error::Timeout(m)
            | Error::Unavailable(m)
            | Error::Backend(m) => m,
        }
    }

    /// Prefixes the message with `context` (`"<context>: <message>"`), keeping the case.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        let m = match &mut self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::InvalidArgument(m)
            | Error::InvalidState(m)
            | Error::Unsupported(m)
            | Error::Denied(m)
            | Error::Timeout(m)
            | Error::Unavailable(m)
            | Error::Backend(m) => m,
        };
        *m = format!("{context}: {m}");
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.kind())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error::{}({:?})", variant_name(self), self.message())
    }
}

fn variant_name(e: &Error) -> &'static str {
    match e {
        Error::NotFound(_) => "NotFound",
        Error::AlreadyExists(_) => "AlreadyExists",
        Error::InvalidArgument(_) => "InvalidArgument",
        Error::InvalidState(_) => "InvalidState",
        Error::Unsupported(_) => "Unsupported",
        Error::Denied(_) => "Denied",
        Error::Timeout(_) => "Timeout",
        Error::Unavailable(_) => "Unavailable",
        Error::Backend(_) => "Backend",
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    /// Maps an I/O error onto the closest case; the message is the I/O error's text.
    fn from(e: std::io::Error) -> Error {
        use std::io::ErrorKind as K;
        let m = e.to_string();
        match e.kind() {
            K::NotFound => Error::NotFound(m),
            K::PermissionDenied | K::ReadOnlyFilesystem => Error::Denied(m),
            K::AlreadyExists => Error::AlreadyExists(m),
            K::InvalidInput | K::InvalidData | K::InvalidFilename => Error::InvalidArgument(m),
            K::TimedOut => Error::Timeout(m),
            K::Unsupported => Error::Unsupported(m),
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
            | K::AddrNotAvailable => Error::Unavailable(m),
            _ => Error::Backend(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_case_and_context_keeps_it() {
        let e = Error::not_found("vm web-1").context("start");
        assert_eq!(e.to_string(), "start: vm web-1 (not-found)");
        assert_eq!(e, Error::NotFound("start: vm web-1".into()));
        assert_eq!(format!("{e:?}"), "Error::NotFound(\"start: vm web-1\")");
    }

    #[test]
    fn io_errors_map_to_cases() {
        let nf = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(Error::from(nf).kind(), "not-found");
        let pd = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no");
        assert_eq!(Error::from(pd).kind(), "denied");
        let other = std::io::Error::other("boom");
        assert_eq!(Error::from(other), Error::Backend("boom".into()));
    }
}
