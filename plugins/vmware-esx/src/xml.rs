//! SOAP XML: writing request bodies (escaped) and reading replies namespace-aware.
//!
//! Replies are parsed with `roxmltree` (no DTDs, so no entity expansion) and read by
//! local name; polymorphic values are typed by `xsi:type` resolved through its
//! namespace, since the simulator writes `XMLSchema-instance:type` where vSphere
//! writes `xsi:type`. Absent properties stay absent (`Option`).

use gve_sdk::{Error, Result};
use roxmltree::{Document, Node, ParsingOptions};

/// The XML Schema instance namespace (`xsi:type`).
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// The SOAP 1.1 envelope namespace.
pub const SOAPENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// Most nodes a reply may have (a 2,400-VM page is far below).
const NODES_LIMIT: u32 = 4_000_000;

/// Escapes text for an element's content or an attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `<name>text</name>` with the text escaped.
pub fn text(name: &str, value: &str) -> String {
    format!("<{name}>{}</{name}>", escape(value))
}

/// A managed object reference argument: `<name type="Type">value</name>`.
pub fn moref(name: &str, r: &MoRef) -> String {
    format!(
        "<{name} type=\"{}\">{}</{name}>",
        escape(&r.kind),
        escape(&r.value)
    )
}

/// The whole SOAP envelope around one method call in the `urn:vim25` namespace.
pub fn envelope(method: &str, this: &MoRef, args: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
<soapenv:Envelope xmlns:soapenv=\"{SOAPENV}\" xmlns:xsi=\"{XSI}\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\
<soapenv:Body><{method} xmlns=\"urn:vim25\">{}{args}</{method}></soapenv:Body></soapenv:Envelope>",
        moref("_this", this)
    )
}

/// A managed object reference: its type and its id (`VirtualMachine` / `vm-57`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    /// Managed object type.
    pub kind: String,
    /// Managed object id.
    pub value: String,
}

impl MoRef {
    /// A reference of `kind` to `value`.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> MoRef {
        MoRef {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

/// Parses a reply body; malformed XML is a backend error naming what was called.
pub fn parse<'a>(body: &'a str, what: &str) -> Result<Document<'a>> {
    let opts = ParsingOptions {
        allow_dtd: false,
        nodes_limit: NODES_LIMIT,
        ..ParsingOptions::default()
    };
    Document::parse_with_options(body, opts)
        .map_err(|e| Error::backend(format!("vSphere {what}: the reply is not valid XML ({e})")))
}

/// The element children of `n`.
pub fn elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

/// The first element child of `n` with local name `name`.
pub fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    elements(n).find(|c| c.tag_name().name() == name)
}

/// Every element child of `n` with local name `name`.
pub fn children<'a, 'i: 'a>(
    n: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    elements(n).filter(move |c| c.tag_name().name() == name)
}

/// The text of `n` (empty when it has none).
pub fn text_of<'a>(n: Node<'a, '_>) -> &'a str {
    n.text().unwrap_or("")
}

/// The text of the child `name` of `n`, if present.
pub fn child_text<'a>(n: Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(n, name).map(text_of)
}

/// The child at `path` (local names) below `n`.
pub fn path<'a, 'i>(n: Node<'a, 'i>, path: &[&str]) -> Option<Node<'a, 'i>> {
    path.iter().try_fold(n, |n, p| child(n, p))
}

/// The `xsi:type` of `n`, resolved by namespace; a prefix in the value is dropped.
pub fn xsi_type<'a>(n: Node<'a, '_>) -> Option<&'a str> {
    n.attribute((XSI, "type"))
        .map(|t| t.rsplit_once(':').map_or(t, |(_, local)| local))
}

/// A managed object reference held by element `n` (`type` attribute and text).
pub fn moref_of(n: Node<'_, '_>) -> Option<MoRef> {
    // By hand: roxmltree's `attribute("type")` also matches a namespaced `x:type`.
    let kind = n
        .attributes()
        .find(|a| a.namespace().is_none() && a.name() == "type")?
        .value();
    let value = n.text()?.trim();
    (!value.is_empty()).then(|| MoRef::new(kind, value))
}

/// The body's first element: the `...Response` or the `Fault`.
pub fn body_element<'a, 'i>(doc: &'a Document<'i>) -> Option<Node<'a, 'i>> {
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" {
        return None;
    }
    let body = elements(env).find(|c| c.tag_name().name() == "Body")?;
    elements(body).next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(text("name", "x&y"), "<name>x&amp;y</name>");
    }

    #[test]
    fn xsi_type_is_resolved_by_namespace_not_prefix() {
        let sim = r#"<r xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"><val XMLSchema-instance:type="TaskInfoState">success</val></r>"#;
        let real = r#"<r xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><val xsi:type="xsd:string">x</val></r>"#;
        let wrong = r#"<r xmlns:xsi="urn:not-xsi"><val xsi:type="Fake">x</val></r>"#;
        for (doc, want) in [
            (sim, Some("TaskInfoState")),
            (real, Some("string")),
            (wrong, None),
        ] {
            let d = parse(doc, "test").unwrap();
            let val = child(d.root_element(), "val").unwrap();
            assert_eq!(xsi_type(val), want, "{doc}");
        }
    }

    #[test]
    fn dtds_are_refused() {
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>"#;
        assert!(matches!(parse(bomb, "t"), Err(Error::Backend(_))));
    }

    #[test]
    fn envelope_escapes_this() {
        let e = envelope("Login", &MoRef::new("SessionManager", "a<b"), "<x/>");
        assert!(e.contains("<_this type=\"SessionManager\">a&lt;b</_this><x/></Login>"));
        parse(&e, "t").unwrap();
    }
}

#[cfg(test)]
mod sim_tests {
    use super::*;

    #[test]
    fn a_moref_value_keeps_its_type_beside_xsi_type() {
        let body = r#"<val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ManagedObjectReference" type="HostSystem">host-42</val>"#;
        let d = parse(body, "t").unwrap();
        assert_eq!(
            moref_of(d.root_element()),
            Some(MoRef::new("HostSystem", "host-42"))
        );
        assert_eq!(xsi_type(d.root_element()), Some("ManagedObjectReference"));
    }
}
