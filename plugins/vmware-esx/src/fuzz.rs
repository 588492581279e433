//! A mutation fuzzer for everything that reads a server's reply: the XML parser, the
//! SOAP body and fault readers, the property pages, VM records, task errors and the
//! service content. No input may panic; every one must end in a value or a typed
//! error. Seeds are replies of the forms the simulator and vSphere send; each round
//! mutates one (bytes flipped, cut, spliced, markup and entities inserted).
//!
//! `cargo test -p gve-plugin-vmware-esx fuzz` runs 3,000 inputs;
//! `GVE_FUZZ_ITERS=N` runs N (`bash bench/run.sh fuzz` runs 300,000 and records it).

use crate::fault::Fault;
use crate::props;
use crate::soap;
use crate::vm::Record;
use crate::xml::{self, MoRef};

const ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>BODY</soapenv:Body></soapenv:Envelope>"#;

const BODIES: &[&str] = &[
    r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>1</token><objects><obj type="VirtualMachine">vm-57</obj><propSet><name>name</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">DC0_H0_VM0</val></propSet><propSet><name>config.template</name><val xsi:type="xsd:boolean">false</val></propSet><propSet><name>config.hardware.numCPU</name><val xsi:type="xsd:int">2</val></propSet><propSet><name>config.extraConfig</name><val xsi:type="ArrayOfOptionValue"><OptionValue xsi:type="OptionValue"><key>gve.label.owner</key><value xsi:type="xsd:string">alice</value></OptionValue></val></propSet><propSet><name>runtime.host</name><val xsi:type="ManagedObjectReference" type="HostSystem">host-21</val></propSet><propSet><name>guest.net</name><val xsi:type="ArrayOfGuestNicInfo"><GuestNicInfo><ipAddress>10.0.0.7</ipAddress></GuestNicInfo></val></propSet></objects><objects><obj type="VirtualMachine">vm-60</obj><missingSet><path>name</path><fault><fault xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-60</obj></fault></fault></missingSet></objects></returnval></RetrievePropertiesExResponse>"#,
    r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault>"#,
    r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">task-76</obj><propSet><name>info.error</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="LocalizedMethodFault"><fault XMLSchema-instance:type="InvalidPowerState"><requestedState>poweredOn</requestedState><existingState>poweredOn</existingState></fault><localizedMessage>*types.InvalidPowerState</localizedMessage></val></propSet><propSet><name>info.state</name><val xsi:type="TaskInfoState">error</val></propSet></objects></returnval></RetrievePropertiesExResponse>"#,
    r#"<RetrieveServiceContentResponse xmlns="urn:vim25"><returnval><rootFolder type="Folder">group-d1</rootFolder><propertyCollector type="PropertyCollector">propertyCollector</propertyCollector><viewManager type="ViewManager">ViewManager</viewManager><about><name>VMware vCenter Server</name><version>6.5.0</version><apiType>VirtualCenter</apiType><apiVersion>6.5</apiVersion></about><sessionManager type="SessionManager">SessionManager</sessionManager><guestOperationsManager type="GuestOperationsManager">guestOperationsManager</guestOperationsManager></returnval></RetrieveServiceContentResponse>"#,
    r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="ContainerView">session[a]b</obj><propSet><name>view</name><val xsi:type="ArrayOfManagedObjectReference"><ManagedObjectReference type="VirtualMachine" xsi:type="ManagedObjectReference">vm-1</ManagedObjectReference><ManagedObjectReference type="VirtualMachine">vm-2</ManagedObjectReference></val></propSet></objects></returnval></RetrievePropertiesExResponse>"#,
];

const DICT: &[&str] = &[
    "<",
    ">",
    "</",
    "/>",
    "<returnval>",
    "</returnval>",
    "<objects>",
    "</objects>",
    "<propSet>",
    "<val xsi:type=\"x:y:z\">",
    "xsi:type=\"\"",
    " type=\"\"",
    "&amp;",
    "&#0;",
    "&#x110000;",
    "&bogus;",
    "<![CDATA[",
    "]]>",
    "<!--",
    "-->",
    "<?pi?>",
    "<!DOCTYPE r [<!ENTITY a \"b\">]>",
    "\u{0}",
    "\u{FEFF}",
    "é",
    "xmlns:xsi=\"\"",
    "xmlns=\"urn:other\"",
    "<fault>",
    "<missingSet>",
    "<token>",
    "9999999999999999999999",
    "-1",
    ":",
    "'",
    "\"",
];

/// Runs every reader on `text` (as the client would, and a few more ways).
pub fn drive(text: &str) {
    let Ok(doc) = xml::parse(text, "fuzz") else {
        return;
    };
    let root = doc.root_element();
    if let Some(el) = xml::body_element(&doc) {
        if el.tag_name().name() == "Fault" {
            let _ = Fault::from_soap(el).to_error("fuzz");
        }
        let _ = props::read_page(el, &mut |id, p| {
            let r = Record::read(id, p);
            let _ = r.info(&Default::default());
            if let Some(e) = props::get(p, "info.error") {
                let _ = Fault::from_localized(e).to_error("fuzz");
            }
            let _ = props::moref(p, "runtime.host");
            let _ = props::number::<u64>(p, "config.hardware.memoryMB");
            Ok(())
        });
        if let Some(rv) = xml::child(el, "returnval") {
            let _ = soap::service_content(rv);
        }
    }
    // Every element, read every way.
    for n in root.descendants().filter(|n| n.is_element()) {
        let _ = xml::xsi_type(n);
        let _ = xml::moref_of(n);
        let _ = Fault::from_localized(n);
        let _ = Fault::from_soap(n);
        let _ = Record::read(
            MoRef::new("VirtualMachine", "vm-0"),
            &[("guest.net", n), ("config.extraConfig", n), ("name", n)],
        );
    }
}

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutates `seed` a few times.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(6) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.truncate(at),
            2 => {
                let w = DICT[rng.below(DICT.len())].as_bytes();
                b.splice(at..at, w.iter().copied());
            }
            3 if !b.is_empty() => {
                let end = (at + rng.below(64)).min(b.len());
                b.drain(at.min(end)..end);
            }
            4 => {
                // Splice a piece of another seed in.
                let other = BODIES[rng.below(BODIES.len())].as_bytes();
                let from = rng.below(other.len());
                let to = (from + rng.below(200)).min(other.len());
                b.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                // Duplicate a piece (deep nesting, repeated elements).
                let from = rng.below(b.len() + 1);
                let to = (from + rng.below(300)).min(b.len());
                let piece = b[from..to].to_vec();
                b.splice(at..at, piece);
            }
        }
    }
    b
}

/// Text that keeps the XML well formed but may surprise a reader.
const VALUES: &[&str] = &[
    "",
    "0",
    "-1",
    "18446744073709551616",
    "true",
    "poweredOn",
    "suspended",
    "x",
    "vm-1",
    "ManagedObjectNotFound",
    "  spaced  ",
    "&lt;tag&gt;",
    "&#233;",
    "1e9",
];

/// Mutates `seed` keeping it well formed: an element removed, duplicated or moved,
/// or a text replaced.
fn reshape(rng: &mut Rng, seed: &str) -> Vec<u8> {
    let Ok(doc) = roxmltree::Document::parse(seed) else {
        return seed.as_bytes().to_vec();
    };
    let elements: Vec<_> = doc
        .descendants()
        .filter(|n| n.is_element())
        .map(|n| n.range())
        .collect();
    let texts: Vec<_> = doc
        .descendants()
        .filter(|n| n.is_text())
        .map(|n| n.range())
        .collect();
    let mut b = seed.as_bytes().to_vec();
    let pick = |rng: &mut Rng, v: &[core::ops::Range<usize>]| v[rng.below(v.len())].clone();
    match rng.below(4) {
        0 if elements.len() > 1 => {
            let r = pick(rng, &elements[1..]);
            b.drain(r);
        }
        1 if elements.len() > 1 => {
            let r = pick(rng, &elements[1..]);
            let piece = b[r.clone()].to_vec();
            let times = 1 + rng.below(20);
            for _ in 0..times {
                b.splice(r.end..r.end, piece.iter().copied());
            }
        }
        2 if elements.len() > 2 => {
            // An element copied next to another one, anywhere in the tree.
            let from = pick(rng, &elements[1..]);
            let to = pick(rng, &elements[1..]);
            let piece = b[from].to_vec();
            b.splice(to.start..to.start, piece);
        }
        _ if !texts.is_empty() => {
            let r = pick(rng, &texts);
            let v = VALUES[rng.below(VALUES.len())];
            b.splice(r, v.bytes());
        }
        _ => {}
    }
    b
}

/// Runs `iters` mutated inputs; returns how many parsed as XML.
pub fn run(iters: u64) -> u64 {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut parsed = 0;
    for i in 0..iters {
        let body = BODIES[(i % BODIES.len() as u64) as usize];
        let seed = ENV.replace("BODY", body);
        let input = if rng.below(2) == 0 {
            let once = reshape(&mut rng, &seed);
            let again = String::from_utf8_lossy(&once).into_owned();
            reshape(&mut rng, &again)
        } else {
            mutate(&mut rng, seed.as_bytes())
        };
        let text = String::from_utf8_lossy(&input);
        if xml::parse(&text, "fuzz").is_ok() {
            parsed += 1;
        }
        drive(&text);
    }
    parsed
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_replies_never_panic_the_readers() {
        let iters = std::env::var("GVE_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3_000);
        let t = std::time::Instant::now();
        let parsed = super::run(iters);
        println!(
            "fuzz: {iters} mutated replies ({parsed} well-formed XML) read without a panic in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // The mutations must not all break the XML, or the readers were not reached.
        assert!(parsed * 10 > iters, "only {parsed} of {iters} parsed");
    }
}
