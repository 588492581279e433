//! The PropertyCollector: properties of objects named directly or of every object of
//! a type in the inventory (a ContainerView), read page by page
//! (RetrievePropertiesEx, ContinueRetrievePropertiesEx).

use gve_sdk::{Error, Result};
use roxmltree::Node;

use crate::soap::Client;
use crate::xml::{self, MoRef};

/// Objects per page of a listing: bounds the plugin's memory whatever the inventory size.
pub const PAGE: u32 = 200;

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
    let mut prop_set = format!("<propSet>{}", xml::text("type", kind));
    for p in props {
        prop_set.push_str(&xml::text("pathSet", p));
    }
    prop_set.push_str("</propSet>");
    let mut view = None;
    let object_set = match objects {
        Objects::These(list) => {
            if list.is_empty() {
                return Ok(());
            }
            list.iter()
                .map(|o| {
                    format!(
                        "<objectSet>{}<skip>false</skip></objectSet>",
                        xml::moref("obj", o)
                    )
                })
                .collect::<String>()
        }
        Objects::All => {
            let v = create_view(client, kind)?;
            let set = format!(
                "<objectSet>{}<skip>true</skip><selectSet xsi:type=\"TraversalSpec\">\
                 <name>gve-view</name><type>ContainerView</type><path>view</path><skip>false</skip>\
                 </selectSet></objectSet>",
                xml::moref("obj", &v)
            );
            view = Some(v);
            set
        }
    };
    let args = format!(
        "<specSet>{prop_set}{object_set}</specSet><options><maxObjects>{PAGE}</maxObjects></options>"
    );
    let pc = client.content.property_collector.clone();
    let result = (|| {
        let mut token = client.call("RetrievePropertiesEx", &pc, &args, |r| {
            read_page(r, &mut each)
        })?;
        while let Some(t) = token {
            token = client.call(
                "ContinueRetrievePropertiesEx",
                &pc,
                &xml::text("token", &t),
                |r| read_page(r, &mut each),
            )?;
        }
        Ok(())
    })();
    if let Some(v) = view {
        // Views hold server memory; one per listing, destroyed at once.
        let _ = client.call("DestroyView", &v, "", |_| Ok(()));
    }
    result
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
fn read_page(
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
