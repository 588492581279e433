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
        Objects::These(list) => {
            for batch in list.chunks(PAGE) {
                batch_of(client, kind, props, batch, &mut each)?;
            }
            Ok(())
        }
        Objects::All => {
            let all = every(client, kind)?;
            for batch in all.chunks(PAGE) {
                batch_of(client, kind, props, batch, &mut each)?;
            }
            Ok(())
        }
    }
}

/// Reads `props` of the objects of `batch` (and of the pages the server makes of it).
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
    let pc = client.content.property_collector.clone();
    let first = client.call("RetrievePropertiesEx", &pc, &args, |r| read_page(r, each));
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
    while let Some(t) = token {
        token = client.call(
            "ContinueRetrievePropertiesEx",
            &pc,
            &xml::text("token", &t),
            |r| read_page(r, each),
        )?;
    }
    Ok(())
}

/// Every object of type `kind` in the inventory: a container view's references.
fn every(client: &mut Client, kind: &str) -> Result<Vec<MoRef>> {
    let view = create_view(client, kind)?;
    let mut refs = Vec::new();
    let r = batch_of(
        client,
        "ContainerView",
        &["view"],
        core::slice::from_ref(&view),
        &mut |_, p| {
            if let Some(v) = get(p, "view") {
                refs.extend(xml::elements(v).filter_map(xml::moref_of));
            }
            Ok(())
        },
    );
    // Views hold server memory: one per listing, destroyed at once.
    let _ = client.call("DestroyView", &view, "", |_| Ok(()));
    r.map(|()| refs)
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

/// Hands each object of a page to `each`; returns the page's continuation token.
pub(crate) fn read_page(
    response: Node<'_, '_>,
    each: &mut impl FnMut(MoRef, &[Prop<'_, '_>]) -> Result<()>,
) -> Result<Option<String>> {
    let Some(rv) = xml::child(response, "returnval") else {
        return Ok(None);
    };
    let mut props = Vec::new();
    for obj in xml::children(rv, "objects") {
        let Some(r) = xml::child(obj, "obj").and_then(xml::moref_of) else {
            continue;
        };
        // An object deleted while being listed comes back with a missingSet fault.
        let gone = xml::children(obj, "missingSet").any(|m| {
            xml::path(m, &["fault", "fault"])
                .and_then(xml::xsi_type)
                .is_some_and(|t| t == "ManagedObjectNotFound")
        });
        if gone {
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
    Ok(xml::child_text(rv, "token").map(str::to_string))
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
