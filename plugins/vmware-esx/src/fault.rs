//! vSphere faults and their mapping onto the contract's error kinds.
//!
//! A fault keeps the server's own message; the kind follows the issue's table:
//! power state → invalid-state, unknown object or file → not-found, login and
//! permission → denied, duplicates → already-exists, not implemented → unsupported,
//! guest tools or host unreachable → unavailable, anything else → backend.

use gve_sdk::Error;
use roxmltree::Node;

use crate::xml;

/// A SOAP fault or a task's error, as the server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The fault's type without the `Fault` suffix (`InvalidPowerState`, ...).
    pub kind: String,
    /// The server's message (`faultstring` or `localizedMessage`), may be empty.
    pub message: String,
    /// `existingState` of an `InvalidPowerState`, when given.
    pub existing_state: Option<String>,
}

impl Fault {
    /// Reads a `soapenv:Fault` element.
    pub fn from_soap(fault: Node<'_, '_>) -> Fault {
        let message = xml::child_text(fault, "faultstring")
            .unwrap_or("")
            .trim()
            .to_string();
        let detail = xml::child(fault, "detail").and_then(|d| xml::elements(d).next());
        Fault::from_detail(detail, message)
    }

    /// Reads a `LocalizedMethodFault` (a task's `info.error`).
    pub fn from_localized(error: Node<'_, '_>) -> Fault {
        let message = xml::child_text(error, "localizedMessage")
            .unwrap_or("")
            .trim()
            .to_string();
        Fault::from_detail(xml::child(error, "fault"), message)
    }

    fn from_detail(detail: Option<Node<'_, '_>>, message: String) -> Fault {
        let kind = detail
            .map(|d| {
                xml::xsi_type(d)
                    .unwrap_or_else(|| d.tag_name().name())
                    .trim_end_matches("Fault")
                    .to_string()
            })
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "UnknownFault".into());
        let existing_state = detail
            .and_then(|d| xml::child_text(d, "existingState"))
            .map(str::to_string);
        // The simulator's task messages are Go type names ("*types.InvalidPowerState"):
        // say what the fault was instead.
        let message = if message.is_empty() || message.starts_with("*types.") {
            match &existing_state {
                Some(s) => format!("{kind} (the VM is {s})"),
                None => kind.clone(),
            }
        } else {
            message
        };
        Fault {
            kind,
            message,
            existing_state,
        }
    }

    /// Whether the session has expired or was never valid.
    pub fn is_not_authenticated(&self) -> bool {
        self.kind == "NotAuthenticated"
    }

    /// The contract's error for this fault, with `context` (what was being done).
    pub fn to_error(&self, context: &str) -> Error {
        let msg = format!("{context}: {} ({})", self.message, self.kind);
        match self.kind.as_str() {
            "InvalidPowerState"
            | "InvalidState"
            | "TaskInProgress"
            | "VmConfigIncompatibleForFaultTolerance"
            | "InvalidDatastoreState"
            | "InvalidHostState"
            | "DisallowedOperationOnFailoverHostFault" => Error::invalid_state(msg),
            "ManagedObjectNotFound" | "FileNotFound" | "NotFound" | "GuestProcessNotFound" => {
                Error::not_found(msg)
            }
            "InvalidLogin"
            | "NoPermission"
            | "NotAuthenticated"
            | "InvalidGuestLogin"
            | "GuestPermissionDenied"
            | "RestrictedVersion"
            | "SecurityError" => Error::denied(msg),
            "DuplicateName" | "AlreadyExists" | "FileAlreadyExists" => Error::already_exists(msg),
            "NotSupported"
            | "MethodNotFound"
            | "NotImplemented"
            | "OperationNotSupportedByGuest" => Error::unsupported(msg),
            "InvalidArgument" | "InvalidRequest" | "InvalidName" | "InvalidType" | "NotAFile"
            | "NotADirectory" => Error::invalid_argument(msg),
            "HostCommunication"
            | "HostNotConnected"
            | "HostNotReachable"
            | "GuestOperationsUnavailable"
            | "ToolsUnavailable"
            | "GuestComponentsOutOfDate"
            | "RequestCanceled" => Error::unavailable(msg),
            _ => Error::backend(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(body: &str) -> Fault {
        let doc = xml::parse(body, "t").unwrap();
        let f = xml::body_element(&doc).unwrap();
        Fault::from_soap(f)
    }

    const NOT_AUTH: &str = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring></faultstring><detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"><object type="VirtualMachine">vm-57</object></NotAuthenticatedFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;

    #[test]
    fn soap_faults_are_typed_by_xsi_type() {
        let f = fault(NOT_AUTH);
        assert_eq!(f.kind, "NotAuthenticated");
        assert!(f.is_not_authenticated());
        assert!(
            matches!(f.to_error("power on vm-57"), Error::Denied(m) if m.contains("power on vm-57"))
        );
    }

    #[test]
    fn a_fault_without_xsi_type_is_named_by_its_element() {
        let body = NOT_AUTH
            .replace(" xsi:type=\"NotAuthenticated\"", "")
            .replace("NotAuthenticatedFault", "InvalidLoginFault")
            .replace(
                "<faultstring></faultstring>",
                "<faultstring>Login failure</faultstring>",
            );
        let f = fault(&body);
        assert_eq!(
            (f.kind.as_str(), f.message.as_str()),
            ("InvalidLogin", "Login failure")
        );
        assert!(matches!(f.to_error("login"), Error::Denied(_)));
    }

    #[test]
    fn task_errors_keep_the_power_state() {
        let body = r#"<error xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"><fault XMLSchema-instance:type="InvalidPowerState"><requestedState>poweredOn</requestedState><existingState>poweredOn</existingState></fault><localizedMessage>*types.InvalidPowerState</localizedMessage></error>"#;
        let doc = xml::parse(body, "t").unwrap();
        let f = Fault::from_localized(doc.root_element());
        assert_eq!(f.kind, "InvalidPowerState");
        assert_eq!(f.existing_state.as_deref(), Some("poweredOn"));
        assert!(matches!(f.to_error("start x"), Error::InvalidState(m) if m.contains("poweredOn")));
    }

    #[test]
    fn kinds_map_as_the_contract_says() {
        let kind = |k: &str| {
            Fault {
                kind: k.into(),
                message: "m".into(),
                existing_state: None,
            }
            .to_error("c")
            .kind()
        };
        assert_eq!(kind("ManagedObjectNotFound"), "not-found");
        assert_eq!(kind("DuplicateName"), "already-exists");
        assert_eq!(kind("NoPermission"), "denied");
        assert_eq!(kind("NotSupported"), "unsupported");
        assert_eq!(kind("GuestOperationsUnavailable"), "unavailable");
        assert_eq!(kind("SomethingElse"), "backend");
    }
}
