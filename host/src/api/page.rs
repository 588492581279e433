//! Paged listings. A page is a JSON array, as an unpaged listing was; when more
//! follow, its `Link: <…>; rel="next"` header (RFC 8288) names the next page, so
//! a client follows links without knowing the cursor's form, and the order is
//! stable (ids) whatever is added meanwhile.

use hyper::StatusCode;
use serde::Serialize;

use super::{json_response, ApiError, Response};

/// Listings answer at most this many items per page unless `limit` says fewer.
pub const DEFAULT_PAGE: u64 = 1000;

/// A listing's `limit` (default [`DEFAULT_PAGE`], 1 to [`super::MAX_LIST`]) and
/// its cursor, the query parameter named `cursor` (`after` or `before`).
pub fn page_query(uri: &hyper::Uri, cursor: &str) -> Result<(u64, Option<String>), ApiError> {
    let limit = super::query_u64(uri, "limit", DEFAULT_PAGE, 1, super::MAX_LIST)?;
    Ok((limit, super::query_param(uri, cursor)?))
}

/// 200 with `items`; with `next` (a path and query), a `Link` to it.
pub fn ok_page<T: Serialize>(items: &[T], next: Option<String>) -> Result<Response, ApiError> {
    let mut resp = json_response(StatusCode::OK, items);
    if let Some(next) = next {
        let link = format!("<{next}>; rel=\"next\"");
        match hyper::header::HeaderValue::from_str(&link) {
            Ok(v) => {
                resp.headers_mut().insert(hyper::header::LINK, v);
            }
            Err(_) => return Err(ApiError::bad_request("a page cursor is not a valid header")),
        }
    }
    Ok(resp)
}

/// The path of the page after one ending with item `last` when `more` follow:
/// `path?limit=…&cursor=last` (and `&all=true` for an admin's whole list).
pub fn next_path(
    path: &str,
    cursor: &str,
    last: Option<&str>,
    more: bool,
    limit: u64,
    all: bool,
) -> Option<String> {
    let last = last.filter(|_| more)?;
    let all = if all { "&all=true" } else { "" };
    Some(format!(
        "{path}?limit={limit}&{cursor}={}{all}",
        encode_query(last)
    ))
}

/// `s` percent-encoded for a query value (everything but RFC 3986's unreserved).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The next page's path and query from a `Link` header, if it has a `next`.
pub fn next_link(headers: &hyper::HeaderMap) -> Option<String> {
    for v in headers.get_all(hyper::header::LINK) {
        let v = v.to_str().ok()?;
        for part in v.split(',') {
            let Some((target, params)) = part.trim().split_once(';') else {
                continue;
            };
            let Some(target) = target
                .trim()
                .strip_prefix('<')
                .and_then(|t| t.strip_suffix('>'))
            else {
                continue;
            };
            if params.split(';').any(|p| {
                let p = p.trim();
                p == "rel=\"next\"" || p == "rel=next"
            }) {
                return Some(target.to_string());
            }
        }
    }
    None
}

/// Whether the request's `If-None-Match` names entity tag `tag` (or is `*`);
/// the weak comparison of RFC 9110 (a `W/` prefix is ignored).
pub fn matches_tag(headers: &hyper::HeaderMap, tag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let tag = bare(tag);
    headers
        .get_all(hyper::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || bare(t) == tag)
}

/// 304 Not Modified with entity tag `tag`.
pub fn not_modified(tag: &str) -> Response {
    let mut resp = hyper::Response::new(super::full(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    set_tag(&mut resp, tag);
    resp
}

/// Sets the `ETag` header (a tag that is not a valid header value is left out).
pub fn set_tag(resp: &mut Response, tag: &str) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(tag) {
        resp.headers_mut().insert(hyper::header::ETAG, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_is_compared_weakly_and_by_list() {
        let with = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert(hyper::header::IF_NONE_MATCH, v.parse().unwrap());
            h
        };
        let tag = "\"r1-7\"";
        assert!(matches_tag(&with("\"r1-7\""), tag));
        assert!(matches_tag(&with("W/\"r1-7\""), tag));
        assert!(matches_tag(&with("\"x\",  \"r1-7\""), tag));
        assert!(matches_tag(&with("*"), tag));
        for miss in ["\"r1-70\"", "\"r1-7", "r1-7", "", ",,", "\"r2-7\""] {
            assert!(!matches_tag(&with(miss), tag), "{miss:?}");
        }
        assert!(!matches_tag(&hyper::HeaderMap::new(), tag));
    }

    #[test]
    fn links_are_written_and_read_back() {
        let resp = ok_page(
            &[1, 2],
            Some(format!("/v1/vms?after={}", encode_query("a b&c"))),
        )
        .unwrap();
        assert_eq!(
            next_link(resp.headers()).as_deref(),
            Some("/v1/vms?after=a%20b%26c")
        );
        assert!(next_link(ok_page(&[1], None).unwrap().headers()).is_none());
        let mut h = hyper::HeaderMap::new();
        h.insert(
            hyper::header::LINK,
            "</a>; rel=\"prev\", </b>; rel=\"next\"".parse().unwrap(),
        );
        assert_eq!(next_link(&h).as_deref(), Some("/b"));
        h.insert(hyper::header::LINK, "garbage".parse().unwrap());
        assert_eq!(next_link(&h), None);
        // A part without parameters does not hide the next one.
        h.insert(hyper::header::LINK, "</x>, </y>; rel=next".parse().unwrap());
        assert_eq!(next_link(&h).as_deref(), Some("/y"));
    }
}
