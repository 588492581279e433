//! One authenticated vSphere SOAP session: the service content, the session cookie,
//! transparent re-login on `NotAuthenticated`, and Logout when dropped.

use core::time::Duration;

use gve_sdk::http::{Request, Response};
use gve_sdk::{log, Error, Result};
use roxmltree::Node;

use crate::fault::Fault;
use crate::xml::{self, MoRef};

/// The session cookie vSphere sets at Login.
const COOKIE: &str = "vmware_soap_session";
/// The API namespace asked for before the server said which version it speaks.
const FIRST_ACTION: &str = "urn:vim25/6.5";
/// Largest reply accepted (a page of properties is far smaller).
const MAX_REPLY: usize = 32 << 20;

/// Well-known managed objects, read from `RetrieveServiceContent`.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    /// The inventory's root folder.
    pub root_folder: MoRef,
    /// The property collector.
    pub property_collector: MoRef,
    /// The view manager (container views).
    pub view_manager: MoRef,
    /// The session manager (Login, Logout).
    pub session_manager: MoRef,
    /// The guest operations manager, when the server has one.
    pub guest_operations_manager: Option<MoRef>,
    /// `about.name` (product name).
    pub name: String,
    /// `about.version`.
    pub version: String,
    /// `about.apiType`: `HostAgent` (ESXi) or `VirtualCenter`.
    pub api_type: String,
    /// `about.apiVersion`.
    pub api_version: String,
}

/// Where and how to reach a vSphere SDK endpoint.
#[derive(Clone)]
pub struct Endpoint {
    /// `https://host[:port]/sdk`.
    pub url: String,
    /// `scheme://host[:port]`, for the file transfer URLs the server hands out.
    pub origin: String,
    /// Host part of the authority.
    pub host: String,
    /// Login user.
    pub username: String,
    /// Login password; never logged.
    pub password: String,
    /// Budget of one SOAP request.
    pub timeout: Duration,
}

impl core::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Reads an endpoint string (`https://host[:port][/sdk]`); `http://` only when
    /// `plain_http` (the operator's explicit opt-in).
    pub fn parse(
        endpoint: &str,
        username: String,
        password: String,
        plain_http: bool,
        timeout: Duration,
    ) -> Result<Endpoint> {
        let bad = |why: &str| {
            Error::invalid_argument(format!(
                "vSphere endpoint {endpoint:?}: {why} (expected https://HOST[:PORT]/sdk)"
            ))
        };
        let (scheme, rest) = endpoint.split_once("://").ok_or_else(|| bad("no scheme"))?;
        match scheme {
            "https" => {}
            "http" if plain_http => {}
            "http" => {
                return Err(Error::denied(format!(
                    "vSphere endpoint {endpoint}: plain HTTP sends the password in clear; \
                     the operator must set plain-http=true in this plugin's config to allow it"
                )))
            }
            _ => return Err(bad("the scheme is not https")),
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') || authority.contains(['?', '#']) {
            return Err(bad("bad authority"));
        }
        let path = match path {
            "" | "/" => "/sdk",
            p if p.contains(['?', '#']) => return Err(bad("a query or fragment is not allowed")),
            p => p,
        };
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        if username.is_empty() {
            return Err(Error::invalid_argument(format!(
                "vSphere endpoint {endpoint}: a username (and password) is required"
            )));
        }
        Ok(Endpoint {
            url: format!("{scheme}://{authority}{path}"),
            origin: format!("{scheme}://{authority}"),
            host: host.to_string(),
            username,
            password,
            timeout,
        })
    }
}

/// A logged-in session.
pub struct Client {
    /// Where it is connected.
    pub endpoint: Endpoint,
    /// The server's well-known objects.
    pub content: ServiceContent,
    action: String,
    cookie: Option<String>,
    /// Bumped at every (re-)login: objects made in an older session (views) are gone.
    pub generation: u64,
    /// Time each request and task wait leaves of the call's budget for the clean-up
    /// after a step that may fail (zero but around such a step).
    pub reserve: Duration,
}

impl Client {
    /// Reads the service content and logs in.
    pub fn connect(endpoint: Endpoint) -> Result<Client> {
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let mut client = Client {
            endpoint,
            content: ServiceContent {
                root_folder: si.clone(),
                property_collector: si.clone(),
                view_manager: si.clone(),
                session_manager: si.clone(),
                guest_operations_manager: None,
                name: String::new(),
                version: String::new(),
                api_type: String::new(),
                api_version: String::new(),
            },
            action: FIRST_ACTION.into(),
            cookie: None,
            generation: 0,
            reserve: Duration::ZERO,
        };
        client.content = client.call("RetrieveServiceContent", &si, "", |r| {
            let rv = xml::child(r, "returnval")
                .ok_or_else(|| Error::backend("vSphere RetrieveServiceContent: no returnval"))?;
            service_content(rv)
        })?;
        if !client.content.api_version.is_empty() {
            client.action = format!("urn:vim25/{}", client.content.api_version);
        }
        client.login()?;
        Ok(client)
    }

    fn login(&mut self) -> Result<()> {
        let args = format!(
            "{}{}",
            xml::text("userName", &self.endpoint.username),
            xml::text("password", &self.endpoint.password)
        );
        let sm = self.content.session_manager.clone();
        self.cookie = None;
        self.send("Login", &sm, &args, OnExpiry::Fail, |_| Ok(()))?;
        if self.cookie.is_none() {
            return Err(Error::backend(format!(
                "vSphere Login at {}: the server set no {COOKIE} cookie",
                self.endpoint.url
            )));
        }
        self.generation += 1;
        Ok(())
    }

    /// Calls `method` on `this` with `args` (XML, in schema order) and hands the
    /// `...Response` element to `read`. An expired session is renewed once.
    pub fn call<T>(
        &mut self,
        method: &str,
        this: &MoRef,
        args: &str,
        read: impl FnOnce(Node<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        self.send(method, this, args, OnExpiry::LogIn, read)
    }

    /// Calls `method` as [`Client::call`] does, on the session as it is: an expired
    /// session is `unavailable`, to be read again from the start (for a call that
    /// belongs to the session, as a continuation token does).
    pub fn call_in_session<T>(
        &mut self,
        method: &str,
        this: &MoRef,
        args: &str,
        read: impl FnOnce(Node<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        self.send(method, this, args, OnExpiry::ReadAgain, read)
    }

    fn send<T>(
        &mut self,
        method: &str,
        this: &MoRef,
        args: &str,
        on_expiry: OnExpiry,
        read: impl FnOnce(Node<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        let body = xml::envelope(method, this, args);
        let context = format!("vSphere {method} on {}", this.value);
        let mut retried = false;
        loop {
            let resp = self
                .request(&body)
                .send()
                .map_err(|e| with_context(e, &context))?;
            match self.verdict(&resp, &context)? {
                Verdict::Body(text) => return read_reply(text, &context, read),
                Verdict::Expired(_) if on_expiry == OnExpiry::LogIn && !retried => {
                    retried = true;
                    self.relogin(&context)?;
                }
                Verdict::Expired(_) if on_expiry == OnExpiry::ReadAgain => {
                    return Err(Error::unavailable(format!(
                        "{context}: the session expired during the read; read again"
                    )))
                }
                Verdict::Expired(e) => return Err(e),
            }
        }
    }

    /// The HTTP request carrying a SOAP envelope, with the session's cookie.
    fn request(&self, envelope: &str) -> Request {
        let mut req = Request::post(&self.endpoint.url)
            .header("content-type", "text/xml; charset=utf-8")
            .header("soapaction", format!("\"{}\"", self.action))
            .timeout(self.endpoint.timeout)
            .keep(self.reserve)
            .body(envelope.as_bytes().to_vec());
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("{COOKIE}={c}"));
        }
        req
    }

    /// Logs in again for a reply read at login count `generation`, unless the
    /// session has been renewed since (by the call that read it: its own fault
    /// answer made it log in again).
    pub fn renew(&mut self, generation: u64, context: &str) -> Result<()> {
        if self.generation == generation {
            self.relogin(context)
        } else {
            Ok(())
        }
    }

    fn relogin(&mut self, context: &str) -> Result<()> {
        log::info(&format!(
            "vSphere session at {} expired; logging in again",
            self.endpoint.url
        ));
        self.login().map_err(|e| with_context(e, context))
    }

    /// Takes the session cookie a reply sets, and says whether its body is to be
    /// read, the session expired, or the call failed.
    fn verdict<'r>(&mut self, resp: &'r Response, context: &str) -> Result<Verdict<'r>> {
        if let Some(c) = resp
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .filter_map(|(_, v)| core::str::from_utf8(v).ok())
            .find_map(session_cookie)
        {
            self.cookie = Some(c);
        }
        if resp.body.len() > MAX_REPLY {
            return Err(Error::backend(format!(
                "{context}: the reply has {} bytes, more than {MAX_REPLY}",
                resp.body.len()
            )));
        }
        let text = core::str::from_utf8(&resp.body)
            .map_err(|_| Error::backend(format!("{context}: the reply is not UTF-8")))?;
        match resp.status {
            200 => Ok(Verdict::Body(text)),
            500 => {
                let doc = xml::parse(text, context)?;
                let fault = match xml::body_element(&doc) {
                    Some(el) if el.tag_name().name() == "Fault" => Fault::from_soap(el),
                    _ => {
                        return Err(Error::backend(format!(
                            "{context}: HTTP 500 without a SOAP fault"
                        )))
                    }
                };
                let e = fault.to_error(context);
                if fault.is_not_authenticated() {
                    Ok(Verdict::Expired(e))
                } else {
                    Err(e)
                }
            }
            401 | 403 => Err(Error::denied(format!("{context}: HTTP {}", resp.status))),
            404 => Err(Error::backend(format!(
                "{context}: HTTP 404: no vSphere SDK at {}",
                self.endpoint.url
            ))),
            502..=504 => Err(Error::unavailable(format!(
                "{context}: HTTP {}",
                resp.status
            ))),
            s => Err(Error::backend(format!("{context}: HTTP {s}"))),
        }
    }

    /// Ends the session on the server (best effort).
    pub fn logout(&mut self) {
        if self.cookie.is_none() {
            return;
        }
        let sm = self.content.session_manager.clone();
        if let Err(e) = self.send("Logout", &sm, "", OnExpiry::Fail, |_| Ok(())) {
            log::debug(&format!("vSphere Logout at {}: {e}", self.endpoint.url));
        }
        self.cookie = None;
    }
}

/// What a call does when the server says the session expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnExpiry {
    /// Log in again and send it again, once.
    LogIn,
    /// Fail with the server's fault (Login, Logout).
    Fail,
    /// Fail as `unavailable`: the call cannot outlive its session.
    ReadAgain,
}

/// What a reply holds, before its body is read.
enum Verdict<'r> {
    /// A `...Response` to read (the reply's text).
    Body(&'r str),
    /// `NotAuthenticated`: the session expired (the error, if not retried).
    Expired(Error),
}

/// Hands the `...Response` element of a 200 reply to `read`; a fault is its error.
fn read_reply<T>(
    text: &str,
    context: &str,
    read: impl FnOnce(Node<'_, '_>) -> Result<T>,
) -> Result<T> {
    let doc = xml::parse(text, context)?;
    let el = xml::body_element(&doc)
        .ok_or_else(|| Error::backend(format!("{context}: no SOAP body")))?;
    if el.tag_name().name() == "Fault" {
        return Err(Fault::from_soap(el).to_error(context));
    }
    read(el)
}

impl Drop for Client {
    fn drop(&mut self) {
        self.logout();
    }
}

/// Prefixes an error's message with what was being done (keeping its kind).
pub fn with_context(e: Error, context: &str) -> Error {
    let msg = format!("{context}: {}", e.message());
    match e {
        Error::NotFound(_) => Error::NotFound(msg),
        Error::AlreadyExists(_) => Error::AlreadyExists(msg),
        Error::InvalidArgument(_) => Error::InvalidArgument(msg),
        Error::InvalidState(_) => Error::InvalidState(msg),
        Error::Unsupported(_) => Error::Unsupported(msg),
        Error::Denied(_) => Error::Denied(msg),
        Error::Timeout(_) => Error::Timeout(msg),
        Error::Unavailable(_) => Error::Unavailable(msg),
        Error::Backend(_) => Error::Backend(msg),
    }
}

/// The session id in a `Set-Cookie` value, if it sets the vSphere session cookie.
fn session_cookie(set_cookie: &str) -> Option<String> {
    let first = set_cookie.split(';').next()?.trim();
    let (name, value) = first.split_once('=')?;
    (name.trim() == COOKIE).then(|| value.trim().trim_matches('"').to_string())
}

pub(crate) fn service_content(rv: Node<'_, '_>) -> Result<ServiceContent> {
    let need = |name: &str| {
        xml::child(rv, name).and_then(xml::moref_of).ok_or_else(|| {
            Error::backend(format!(
                "vSphere RetrieveServiceContent: no {name} in the reply"
            ))
        })
    };
    let about = xml::child(rv, "about");
    let about_text = |name: &str| {
        about
            .and_then(|a| xml::child_text(a, name))
            .unwrap_or("")
            .to_string()
    };
    Ok(ServiceContent {
        root_folder: need("rootFolder")?,
        property_collector: need("propertyCollector")?,
        view_manager: need("viewManager")?,
        session_manager: need("sessionManager")?,
        guest_operations_manager: xml::child(rv, "guestOperationsManager").and_then(xml::moref_of),
        name: about_text("name"),
        version: about_text("version"),
        api_type: about_text("apiType"),
        api_version: about_text("apiVersion"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str, plain: bool) -> Result<Endpoint> {
        Endpoint::parse(s, "u".into(), "p".into(), plain, Duration::from_secs(1))
    }

    #[test]
    fn endpoints_are_https_unless_the_operator_allows_plain_http() {
        let e = ep("https://vc.example.org", false).unwrap();
        assert_eq!(e.url, "https://vc.example.org/sdk");
        assert_eq!(e.host, "vc.example.org");
        let e = ep("https://127.0.0.1:8989/sdk", false).unwrap();
        assert_eq!(
            (e.origin.as_str(), e.host.as_str()),
            ("https://127.0.0.1:8989", "127.0.0.1")
        );
        assert!(
            matches!(ep("http://vc:80/sdk", false), Err(Error::Denied(m)) if m.contains("plain-http"))
        );
        assert_eq!(
            ep("http://vc:80/sdk", true).unwrap().url,
            "http://vc:80/sdk"
        );
        for bad in [
            "ftp://vc/sdk",
            "vc.example.org",
            "https://u:p@vc/sdk",
            "https:///sdk",
            "https://vc/sdk?x=1",
        ] {
            assert!(
                matches!(ep(bad, true), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
        let e = ep("https://[::1]:443/sdk", false).unwrap();
        assert_eq!(e.host, "::1");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        assert_eq!(
            session_cookie("vmware_soap_session=\"abc-1\"; Path=/; HttpOnly").as_deref(),
            Some("abc-1")
        );
        assert_eq!(session_cookie("other=1; Path=/"), None);
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let e = Endpoint::parse(
            "https://vc/sdk",
            "u".into(),
            "s3cret".into(),
            false,
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{e:?}").contains("s3cret"));
    }
}
