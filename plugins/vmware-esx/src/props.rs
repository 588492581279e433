//! The PropertyCollector: properties of objects named directly or of every object of
//! a type in the inventory, read in batches.
//!
//! Every object of a type is found through a ContainerView whose `view` (the list of
//! references only) is read first; their properties are then read [`PAGE`] objects
//! at a time. The plugin's memory is bounded by a batch, not the inventory, even
//! against a server that ignores `maxObjects` (the simulator answers 2,400 VMs in one
//! 4.6 MB reply when asked for all of them at once); a server's own paging
//! (`token`, ContinueRetrievePropertiesEx) is followed too.

use gve_sdk::{Error, Result};
use roxmltree::Node;

use crate::soap::Client;
use crate::xml::{self, MoRef};

/// Objects whose properties one request reads: bounds the plugin's memory whatever
/// the inventory size.
pub const PAGE: usize = 100;

/// Which objects to read.
pub enum Objects<'a> {
    /// These objects (all of the type given to [`retrieve`]).
    These(&'a [MoRef]),
    /// Every object of the type in the inventory.
    All,
}

/// One property of one object: its name and value element.
pub type Prop<'a, 'i> = (&'a str, Node<'a, 'i>);

/// Reads `props` of `objects` of type `kind`, handing each object to `each` as it
/// arrives (page by page; a page's XML is dropped before the next is read). Objects
/// that vanished meanwhile are left out.
pub fn retrieve(
    client: &mut Client,
    kind: &str,
    props: &[&str],
    objects: Objects<'_>,
    mut each: impl FnMut(MoRef, &[Prop<'_, '_>]) -> Result<()>,
) -> Result<()> {
    match objects {
        Objects::These(list) => batches(client, kind, props, list, &mut each),
        Objects::All => {
            let all = every(client, kind)?;
            batches(client, kind, props, &all, &mut each)
        }
    }
}

/// Reads `props` of `list`, [`PAGE`] objects a request.
fn batches(
    client: &mut Client,
    kind: &str,
    props: &[&str],
    list: &[MoRef],
    each: &mut impl FnMut(MoRef, &[Prop<'_, '_>]) -> Result<()>,
) -> Result<()> {
    for batch in list.chunks(PAGE) {
        match batch_of(client, kind, props, batch, each) {
            // A batch of one object deleted since it was listed: left out, as one
            // of a larger batch is (`one` still says `not-found` of it).
            Ok(()) | Err(Error::NotFound(_)) if batch.len() == 1 => {}
            r => r?,
        }
    }
    Ok(())
}

/// Reads `props` of the objects of `batch`, and of the pages the server makes of
/// it. When the server withholds the page because the session expired: the batch
/// again after a login (withheld again then, its objects are taken as ones the user
/// may not read). When an object of it was deleted meanwhile: the batch again one
/// object at a time, leaving out the gone.
fn batch_of(
    client: &mut Client,
    kind: &str,
    props: &[&str],
    batch: &[MoRef],
    each: &mut impl FnMut(MoRef, &[Prop<'_, '_>]) -> Result<()>,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let pc = client.content.property_collector.clone();
    let args = request(kind, props, batch);
    let context = format!("vSphere RetrievePropertiesEx of {kind} properties");
    let generation = client.generation;
    let first = match client.call("RetrievePropertiesEx", &pc, &args, |r| read_page(r, each)) {
        Ok(Page::Expired) => {
            client.renew(generation, &context)?;
            client.call("RetrievePropertiesEx", &pc, &args, |r| {
                read_objects(r, each, Withheld::AsUnreadable)
            })
        }
        first => first,
    };
    let mut token = match first {
        // An object deleted since it was listed fails the whole request (vCenter and
        // the simulator alike): read the batch one by one, leaving out the gone.
        Err(Error::NotFound(_)) if batch.len() > 1 => {
            for o in batch {
                match batch_of(client, kind, props, core::slice::from_ref(o), each) {
                    Ok(()) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        r => r?,
    };
    let mut seen = std::collections::BTreeSet::new();
    while let Page::Read(Some(t)) = token {
        if !seen.insert(t.clone()) {
            return Err(Error::backend(format!(
                "{context}: the server sent a continuation token again"
            )));
        }
        // The token is the session's: no login and resend for it.
        token = client.call_in_session(
            "ContinueRetrievePropertiesEx",
            &pc,
            &xml::text("token", &t),
            |r| read_page(r, each),
        )?;
        if let Page::Expired = token {
            return Err(Error::unavailable(format!(
                "{context}: the session expired between pages of the reply; read again"
            )));
        }
    }
    Ok(())
}

/// The arguments of a RetrievePropertiesEx of `props` of `batch`.
fn request(kind: &str, props: &[&str], batch: &[MoRef]) -> String {
    let mut args = format!("<specSet><propSet>{}", xml::text("type", kind));
    for p in props {
        args.push_str(&xml::text("pathSet", p));
    }
    args.push_str("</propSet>");
    for o in batch {
        args.push_str(&format!(
            "<objectSet>{}<skip>false</skip></objectSet>",
            xml::moref("obj", o)
        ));
    }
    args.push_str(&format!(
        "</specSet><options><maxObjects>{PAGE}</maxObjects></options>"
    ));
    args
}

/// Every object of type `kind` in the inventory: a container view's references.
fn every(client: &mut Client, kind: &str) -> Result<Vec<MoRef>> {
    let generation = client.generation;
    let r = match view_of(client, kind) {
        // The view went with a session that expired between its creation and its
        // read (which logged in again): once more, in the new session.
        Err(Error::NotFound(_)) if client.generation != generation => view_of(client, kind),
        r => r,
    };
    // The plugin's own view gone says nothing of the objects asked about: never
    // `not-found` (a caller would take a name as free, or a VM as gone).
    r.map_err(|e| match e {
        Error::NotFound(m) => Error::unavailable(format!(
            "vSphere: the container view of every {kind} went away before it was read ({m}); read again"
        )),
        e => e,
    })
}

/// The references a new container view of `kind` holds; the view is destroyed.
fn view_of(client: &mut Client, kind: &str) -> Result<Vec<MoRef>> {
    let view = create_view(client, kind)?;
    let mut refs = None;
    let r = batch_of(
        client,
        "ContainerView",
        &["view"],
        core::slice::from_ref(&view),
        &mut |_, p| {
            if let Some(v) = get(p, "view") {
                refs = Some(xml::elements(v).filter_map(xml::moref_of).collect());
            }
            Ok(())
        },
    );
    // Views hold server memory: one per listing, destroyed at once.
    let _ = client.call("DestroyView", &view, "", |_| Ok(()));
    r?;
    // The view's contents not given (left out as gone, or withheld) say nothing of
    // the inventory: never an empty one.
    refs.ok_or_else(|| {
        Error::unavailable(format!(
            "vSphere: the server gave no contents of the container view of every {kind}; read again"
        ))
    })
}

/// Properties of one object; `not-found` when it does not exist.
pub fn one(
    client: &mut Client,
    obj: &MoRef,
    props: &[&str],
    mut read: impl FnMut(&[Prop<'_, '_>]) -> Result<()>,
) -> Result<()> {
    let mut found = false;
    let r = retrieve(
        client,
        &obj.kind,
        props,
        Objects::These(core::slice::from_ref(obj)),
        |_, p| {
            found = true;
            read(p)
        },
    );
    match r {
        Err(Error::NotFound(_)) | Ok(()) if !found => Err(Error::not_found(format!(
            "{} {} does not exist",
            obj.kind, obj.value
        ))),
        r => r,
    }
}

fn create_view(client: &mut Client, kind: &str) -> Result<MoRef> {
    let args = format!(
        "{}{}<recursive>true</recursive>",
        xml::moref("container", &client.content.root_folder),
        xml::text("type", kind)
    );
    let vm = client.content.view_manager.clone();
    client.call("CreateContainerView", &vm, &args, |r| {
        xml::child(r, "returnval")
            .and_then(xml::moref_of)
            .ok_or_else(|| Error::backend("vSphere CreateContainerView: no view in the reply"))
    })
}

/// What a page of properties held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Page {
    /// Its objects were handed over; the server's continuation token, if it has more.
    Read(Option<String>),
    /// Nothing was handed over: the server withheld every object's properties as
    /// `NotAuthenticated` (the simulator answers a property read on an expired
    /// session so, with a fault per property rather than for the call).
    Expired,
}

/// How a page whose every object is withheld as `NotAuthenticated` is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Withheld {
    /// As the session's expiry: nothing handed over, [`Page::Expired`].
    AsExpired,
    /// As objects the user may not read (right after a login): handed over.
    AsUnreadable,
}

/// Hands each object of a page to `each`; says whether the page was read (and its
/// continuation token) or withheld because the session expired.
pub(crate) fn read_page(
    response: Node<'_, '_>,
    each: &mut impl FnMut(MoRef, &[Prop<'_, '_>]) -> Result<()>,
) -> Result<Page> {
    read_objects(response, each, Withheld::AsExpired)
}

/// [`read_page`], with a page withheld whole taken as `withheld` says.
fn read_objects(
    response: Node<'_, '_>,
    each: &mut impl FnMut(MoRef, &[Prop<'_, '_>]) -> Result<()>,
    withheld: Withheld,
) -> Result<Page> {
    let Some(rv) = xml::child(response, "returnval") else {
        return Ok(Page::Read(None));
    };
    let fault_is = |obj: Node<'_, '_>, kind: &str| {
        xml::children(obj, "missingSet").any(|m| {
            xml::path(m, &["fault", "fault"])
                .and_then(xml::xsi_type)
                .is_some_and(|t| t == kind)
        })
    };
    // Every object withheld whole as not authenticated: the session, not the
    // objects. Before anything is handed over; the page is read again after a login.
    // One object so among readable ones is kept, as one the user may not read.
    let mut objects = xml::children(rv, "objects").peekable();
    if withheld == Withheld::AsExpired
        && objects.peek().is_some()
        && objects.all(|o| {
            fault_is(o, "NotAuthenticated") && xml::children(o, "propSet").next().is_none()
        })
    {
        return Ok(Page::Expired);
    }
    let mut props = Vec::new();
    for obj in xml::children(rv, "objects") {
        let Some(r) = xml::child(obj, "obj").and_then(xml::moref_of) else {
            continue;
        };
        // An object deleted while being listed comes back with a missingSet fault.
        if fault_is(obj, "ManagedObjectNotFound") {
            continue;
        }
        props.clear();
        for p in xml::children(obj, "propSet") {
            if let (Some(name), Some(val)) = (xml::child_text(p, "name"), xml::child(p, "val")) {
                props.push((name, val));
            }
        }
        each(r, &props)?;
    }
    Ok(Page::Read(xml::child_text(rv, "token").map(str::to_string)))
}

/// The value of property `name`, if present.
pub fn get<'a, 'i>(props: &[Prop<'a, 'i>], name: &str) -> Option<Node<'a, 'i>> {
    props.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The text of property `name`, if present.
pub fn text<'a>(props: &[Prop<'a, '_>], name: &str) -> Option<&'a str> {
    get(props, name).map(xml::text_of)
}

/// Property `name` parsed as a number, if present and numeric.
pub fn number<T: core::str::FromStr>(props: &[Prop<'_, '_>], name: &str) -> Option<T> {
    text(props, name).and_then(|t| t.trim().parse().ok())
}

/// Property `name` as a managed object reference, if present.
pub fn moref(props: &[Prop<'_, '_>], name: &str) -> Option<MoRef> {
    get(props, name).and_then(xml::moref_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    const XSI_NS: &str = "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"";

    fn page(objects: &str) -> String {
        format!("<RetrievePropertiesExResponse xmlns=\"urn:vim25\" {XSI_NS}><returnval>{objects}</returnval></RetrievePropertiesExResponse>")
    }

    fn object(id: &str, inner: &str) -> String {
        format!("<objects><obj type=\"VirtualMachine\">{id}</obj>{inner}</objects>")
    }

    fn missing(path: &str, fault: &str) -> String {
        format!("<missingSet><path>{path}</path><fault><fault xsi:type=\"{fault}\"><object type=\"VirtualMachine\">x</object></fault></fault></missingSet>")
    }

    fn read(text: &str) -> (Result<Page>, Vec<String>) {
        let doc = xml::parse(text, "t").unwrap();
        let mut seen = Vec::new();
        let r = read_page(doc.root_element(), &mut |id, _| {
            seen.push(id.value);
            Ok(())
        });
        (r, seen)
    }

    #[test]
    fn a_page_withheld_as_not_authenticated_hands_nothing_over() {
        let name = "<propSet><name>name</name><val xsi:type=\"xsd:string\">a</val></propSet>";
        // Every object withheld: nothing goes out, the page is read again.
        let withheld =
            missing("name", "NotAuthenticated") + &missing("guest.net", "NotAuthenticated");
        let text = page(&(object("vm-1", &withheld) + &object("vm-2", &withheld)));
        let (r, seen) = read(&text);
        assert_eq!(r.unwrap(), Page::Expired);
        assert!(seen.is_empty(), "{seen:?}");
        // The same right after a login: the objects', handed over as unreadable.
        let doc = xml::parse(&text, "t").unwrap();
        let mut after_login = Vec::new();
        let r = read_objects(
            doc.root_element(),
            &mut |id, p| {
                after_login.push((id.value, p.len()));
                Ok(())
            },
            Withheld::AsUnreadable,
        );
        assert_eq!(r.unwrap(), Page::Read(None));
        assert_eq!(
            after_login,
            [("vm-1".to_string(), 0), ("vm-2".to_string(), 0)]
        );
        // One object withheld among readable ones is the object's, not the
        // session's: kept, as one the user may not read; so is one with a property
        // withheld beside those it has.
        let partly = name.to_string() + &missing("guest.net", "NotAuthenticated");
        let text =
            page(&(object("vm-1", name) + &object("vm-2", &withheld) + &object("vm-3", &partly)));
        let (r, seen) = read(&text);
        assert_eq!(r.unwrap(), Page::Read(None));
        assert_eq!(seen, ["vm-1", "vm-2", "vm-3"]);
        // A deleted object is left out; one the user may not read is kept.
        let text = page(
            &(object("vm-1", name)
                + &object("vm-2", &missing("name", "ManagedObjectNotFound"))
                + &object("vm-3", &missing("guest.net", "NoPermission"))),
        );
        let (r, seen) = read(&text);
        assert_eq!(r.unwrap(), Page::Read(None));
        assert_eq!(seen, ["vm-1", "vm-3"]);
    }
}
