//! Conversions between the contract's generated types and the host's plain errors.

use super::bindings::types::Error;
use super::error::{DriverError, ErrorKind};

impl From<Error> for DriverError {
    fn from(e: Error) -> DriverError {
        let (kind, message) = match e {
            Error::NotFound(m) => (ErrorKind::NotFound, m),
            Error::AlreadyExists(m) => (ErrorKind::AlreadyExists, m),
            Error::InvalidArgument(m) => (ErrorKind::InvalidArgument, m),
            Error::InvalidState(m) => (ErrorKind::InvalidState, m),
            Error::Unsupported(m) => (ErrorKind::Unsupported, m),
            Error::Denied(m) => (ErrorKind::Denied, m),
            Error::Timeout(m) => (ErrorKind::Timeout, m),
            Error::Unavailable(m) => (ErrorKind::Unavailable, m),
            Error::Backend(m) => (ErrorKind::Backend, m),
        };
        DriverError { kind, message }
    }
}

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Error {
        let m = e.message;
        match e.kind {
            ErrorKind::NotFound => Error::NotFound(m),
            ErrorKind::AlreadyExists => Error::AlreadyExists(m),
            ErrorKind::InvalidArgument => Error::InvalidArgument(m),
            ErrorKind::InvalidState => Error::InvalidState(m),
            ErrorKind::Unsupported => Error::Unsupported(m),
            ErrorKind::Denied => Error::Denied(m),
            ErrorKind::Timeout => Error::Timeout(m),
            ErrorKind::Unavailable => Error::Unavailable(m),
            ErrorKind::Backend => Error::Backend(m),
        }
    }
}

impl super::bindings::types::Host for super::state::HostState {}
