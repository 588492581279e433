//! The web portal: static assets embedded in the binary, served by the site at
//! `/portal/` (and `/` redirects there). The page calls the site's own `/v1` API
//! with the token the person pastes (kept in the tab's sessionStorage, sent only
//! in the Authorization header), so there is no second backend and no cookie to
//! forge requests with. Every answer carries a strict Content Security Policy
//! (scripts, styles and connections to this origin only, no inline script, no
//! framing) and the usual hardening headers.

use hyper::header::{HeaderName, HeaderValue};
use hyper::StatusCode;

use crate::api::{full, Response};

/// The page's security headers.
pub const SECURITY_HEADERS: [(&str, &str); 7] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=()",
    ),
];

/// One embedded asset: path under `/portal/`, content type, bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: [Asset; 4] = [
    Asset {
        path: "",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("portal/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("portal/app.js"),
    },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("portal/style.css"),
    },
    Asset {
        path: "vendor/htm-preact.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../third_party/htm-preact/standalone.module.js"),
    },
];

fn with_headers(mut r: Response) -> Response {
    for (k, v) in SECURITY_HEADERS {
        r.headers_mut()
            .insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    r
}

/// Serves `GET /` (a redirect) and `GET /portal/...`; `None` for other paths.
pub fn serve(path: &str) -> Option<Response> {
    if path == "/" || path == "/portal" {
        let mut r = hyper::Response::new(full(""));
        *r.status_mut() = StatusCode::SEE_OTHER;
        r.headers_mut().insert(
            hyper::header::LOCATION,
            HeaderValue::from_static("/portal/"),
        );
        return Some(with_headers(r));
    }
    let rest = path.strip_prefix("/portal/")?;
    let asset = ASSETS.iter().find(|a| a.path == rest);
    let r = match asset {
        Some(a) => {
            let mut r = hyper::Response::new(full(a.body));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static(a.content_type),
            );
            r
        }
        None => {
            let mut r = hyper::Response::new(full("not found\n"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
    };
    Some(with_headers(r))
}
