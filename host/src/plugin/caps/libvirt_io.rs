//! The libvirt capability's bulk half (contract 0.1.1): a volume's bytes written
//! and read through libvirt streams, and disks attached to and detached from
//! running domains. Policy: at most [`MAX_IO`] bytes a call, never past a volume's
//! end; a device must be one `<disk type='file' device='disk'>` whose source is a
//! volume of one of libvirt's storage pools (not any file of the host), and it is
//! changed live only, never in the domain's persistent definition.

use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::libvirt::{lookup, map_err};
use crate::plugin::bindings::types::Error;

/// Most bytes one upload or download call moves.
pub const MAX_IO: u32 = 8 << 20;

/// Writes `data` into the volume at `path` from byte `offset`.
pub fn upload(c: &Connect, path: &str, offset: u64, data: &[u8]) -> Result<(), Error> {
    if data.len() > MAX_IO as usize {
        return Err(Error::InvalidArgument(format!(
            "upload of {} bytes: at most {MAX_IO} a call",
            data.len()
        )));
    }
    let vol = StorageVol::lookup_by_path(c, path).map_err(map_err)?;
    let capacity = vol.get_info().map_err(map_err)?.capacity;
    let end = offset.checked_add(data.len() as u64);
    if end.is_none_or(|end| end > capacity) {
        return Err(Error::InvalidArgument(format!(
            "upload of {} bytes at {offset} runs past the end of {path} ({capacity} bytes)",
            data.len()
        )));
    }
    if data.is_empty() {
        return Ok(());
    }
    let stream = Stream::new(c, 0).map_err(map_err)?;
    vol.upload(&stream, offset, data.len() as u64, 0)
        .map_err(map_err)?;
    let mut sent = 0;
    while sent < data.len() {
        match stream.send(&data[sent..]) {
            Ok(n) if n > 0 => sent += n,
            Ok(_) => {
                let _ = stream.abort();
                return Err(Error::Backend(format!(
                    "libvirt closed the upload to {path} after {sent} of {} bytes",
                    data.len()
                )));
            }
            Err(e) => {
                let _ = stream.abort();
                return Err(map_err(e));
            }
        }
    }
    stream.finish().map_err(map_err)
}

/// Reads up to `length` bytes of the volume at `path` from byte `offset`; fewer
/// only at the volume's end.
pub fn download(c: &Connect, path: &str, offset: u64, length: u32) -> Result<Vec<u8>, Error> {
    if length > MAX_IO {
        return Err(Error::InvalidArgument(format!(
            "download of {length} bytes: at most {MAX_IO} a call"
        )));
    }
    let vol = StorageVol::lookup_by_path(c, path).map_err(map_err)?;
    let capacity = vol.get_info().map_err(map_err)?.capacity;
    let want = capacity.saturating_sub(offset).min(u64::from(length)) as usize;
    if want == 0 {
        return Ok(Vec::new());
    }
    let stream = Stream::new(c, 0).map_err(map_err)?;
    vol.download(&stream, offset, want as u64, 0)
        .map_err(map_err)?;
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match stream.recv(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                let _ = stream.abort();
                return Err(map_err(e));
            }
        }
    }
    if got < want {
        let _ = stream.abort();
        return Err(Error::Backend(format!(
            "libvirt ended the download of {path} after {got} of {want} bytes"
        )));
    }
    // The stream's end (libvirt sends it after the last byte) completes the job.
    let mut rest = [0u8; 1];
    match stream.recv(&mut rest) {
        Ok(0) => stream.finish().map_err(map_err)?,
        _ => {
            let _ = stream.abort();
        }
    }
    Ok(buf)
}

/// Attaches (or with `attach` false, detaches) the disk described by `xml` to the
/// running `domain`, live only.
pub fn change_disk(c: &Connect, domain: &str, xml: &str, attach: bool) -> Result<(), Error> {
    let source = disk_source(xml)?;
    if attach {
        // Only a volume libvirt manages: never an arbitrary file of the host.
        StorageVol::lookup_by_path(c, &source).map_err(|e| {
            Error::Denied(format!(
                "{source} is not a volume of a libvirt storage pool ({}): only pool volumes may be attached",
                e.message()
            ))
        })?;
    }
    let d = lookup(c, domain)?;
    let live = virt::sys::VIR_DOMAIN_AFFECT_LIVE;
    let r = if attach {
        d.attach_device_flags(xml, live)
    } else {
        d.detach_device_flags(xml, live)
    };
    r.map(drop).map_err(|e| {
        let m = e.message().to_ascii_lowercase();
        // No free PCI slot (q35 has few hot-plug ports): the caller can do without.
        if m.contains("pci") && (m.contains("slot") || m.contains("available")) {
            Error::Unavailable(format!("libvirt: {}", e.message()))
        } else {
            map_err(e)
        }
    })
}

/// The source file of a device XML that must be one file-backed disk.
pub fn disk_source(xml: &str) -> Result<String, Error> {
    let refuse = |why: &str| Err(Error::Denied(format!("device refused: {why}")));
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::InvalidArgument(format!("device XML: {e}")))?;
    let disk = doc.root_element();
    if disk.tag_name().name() != "disk"
        || disk.attribute("type") != Some("file")
        || disk.attribute("device") != Some("disk")
    {
        return refuse("only <disk type='file' device='disk'> may be attached or detached");
    }
    // Only what a staged disk needs; anything else (a mirror, a transient
    // overlay, elements libvirt gains later) is refused by default.
    if let Some(other) = disk.children().filter(|n| n.is_element()).find(|n| {
        !["driver", "source", "target", "serial", "address", "alias"].contains(&n.tag_name().name())
    }) {
        return refuse(&format!(
            "<{}> in a disk: only driver, source, target, serial, address and alias may be given",
            other.tag_name().name()
        ));
    }
    let named = |tag: &str| -> Vec<_> { disk.children().filter(|n| n.has_tag_name(tag)).collect() };
    // A format other than raw would let the image name a host file of its own
    // choosing (a qcow2 backing file); a <source> with children can carry more.
    match named("driver").as_slice() {
        [d] if d.attribute("type") == Some("raw")
            && d.attribute("name").is_none_or(|n| n == "qemu") => {}
        _ => return refuse("the disk needs exactly one <driver name='qemu' type='raw'>"),
    }
    match named("source").as_slice() {
        [s] if !s.children().any(|n| n.is_element()) => match s.attribute("file") {
            Some(f) if f.starts_with('/') => Ok(f.to_string()),
            _ => refuse("the disk's <source> needs an absolute file"),
        },
        _ => refuse("the disk needs exactly one <source> without children"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_file_disk_with_an_absolute_source_passes() {
        let ok = "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
                  <source file='/pool/x.raw'/><target dev='vdz' bus='virtio'/></disk>";
        assert_eq!(disk_source(ok).unwrap(), "/pool/x.raw");
        for bad in [
            "<disk type='block' device='disk'><source dev='/dev/sda'/></disk>",
            "<disk type='file' device='cdrom'><source file='/x.iso'/></disk>",
            "<disk type='file' device='disk'><source file='rel.raw'/></disk>",
            "<disk type='file' device='disk'></disk>",
            "<disk type='file' device='disk'><source file='/a'/><source file='/b'/></disk>",
            "<interface type='network'><source network='default'/></interface>",
            "<hostdev mode='subsystem' type='pci'/>",
            // No driver, another format, two drivers, a source with children.
            "<disk type='file' device='disk'><source file='/pool/x.raw'/></disk>",
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/pool/x.raw'/></disk>",
            "<disk type='file' device='disk'><driver type='raw'/><driver type='qcow2'/><source file='/pool/x.raw'/></disk>",
            "<disk type='file' device='disk'><driver type='raw'/><source file='/pool/x.raw'><seclabel relabel='no'/></source></disk>",
            "<disk type='file' device='disk'><driver type='raw'/><source file='/pool/x.raw'/><backingStore/></disk>",
            "<disk type='file' device='disk'><driver type='raw'/><source file='/pool/x.raw'/><transient/></disk>",
        ] {
            assert!(matches!(disk_source(bad), Err(Error::Denied(_))), "{bad}");
        }
        assert!(matches!(
            disk_source("<disk"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
