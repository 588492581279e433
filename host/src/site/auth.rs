//! Identity: bearer tokens (random, shown once, stored as SHA-256) and roles. Every
//! request but `/v1/health` and `/v1/openapi.yaml` is identified before anything else
//! happens; ownership checks answer 404 for other users' objects, so their existence
//! does not leak.

use hyper::{Request, StatusCode};
use sha2::{Digest, Sha256};

use super::model::{Role, User};
use super::store::Store;
use crate::api::ApiError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
}

impl Caller {
    /// True for admins.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Admins only; others get 403.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "denied",
                format!("user '{}' is not an admin", self.name),
            ))
        }
    }

    /// A monitor may only read the metrics and GLUE 2, read its own record and
    /// rotate its own token; anything else is 403 for it, before any handler runs. A
    /// role this release does not know may do nothing.
    pub fn require_route(&self, method: &hyper::Method, segs: &[&str]) -> Result<(), ApiError> {
        match &self.role {
            Role::Admin | Role::User => return Ok(()),
            Role::Other(role) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "denied",
                    format!(
                        "user '{}' has role '{role}', which this site's release does not know: \
                         it may do nothing here",
                        self.name
                    ),
                ))
            }
            Role::Monitor => {}
        }
        let get = method == hyper::Method::GET;
        let allowed = match segs {
            ["metrics"] | ["v1", "glue2"] | ["v1", "me"] => get,
            ["v1", "users", name, "token"] => *method == hyper::Method::POST && *name == self.name,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "denied",
                format!(
                    "user '{}' is a monitor: it may read /metrics, /v1/glue2 and /v1/me only",
                    self.name
                ),
            ))
        }
    }

    /// May this caller see an object owned by `owner`?
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.is_admin() || owner == Some(self.name.as_str())
    }
}

/// A new random token (32 bytes, hex).
pub fn new_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("gve_{}{}", a.simple(), b.simple())
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Identifies the caller of `req` by its bearer token.
pub fn identify<B>(store: &Store, req: &Request<B>) -> Result<Caller, ApiError> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    let user: Option<User> = store
        .user_by_token(&hash(token))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string()))?;
    let user = user.ok_or_else(ApiError::unauthorized)?;
    Ok(Caller {
        name: user.name,
        role: user.role,
    })
}

/// A user name: 1-64 of [a-z0-9._-], starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    validate_id("user name", name)
}

/// A name of the site's objects (users, agents, VMs): 1-64 of [a-z0-9._-], starting
/// with a letter or digit; `what` names it in the error.
pub fn validate_id(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} '{name}' must be 1-64 of [a-z0-9._-], starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 68);
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a), hash(&a.clone()));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("alice").is_ok());
        for bad in ["", "Alice", "-x", "a b", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
