//! Bulk copies (contract 0.1.1, `gve:hypervisor/bulk`): a raw volume
//! `gve-xfer-<id>.raw` in the driver's storage pool, attached to the running
//! domain as a virtio disk whose serial is derived from the id, live only (the
//! persistent definition never names it). Everything is found again from the id,
//! so a host that lost a transfer releases it with [`StagedDisk::release_left`].

use gve_sdk::libvirt::{escape, Connection, DomainState};
use gve_sdk::prelude::*;
use gve_sdk::BulkTransfer;

use crate::domain::DomainView;

/// Size unit of a staged disk: the guest reads and writes it with O_DIRECT in
/// pieces of this size.
pub const UNIT: u64 = 4 << 20;

/// Largest staged disk, bytes (1 TiB).
pub const MAX_SIZE: u64 = 1 << 40;

/// One staged disk attached to a running domain.
pub struct StagedDisk {
    conn: Connection,
    vm: String,
    path: String,
    serial: String,
    target: String,
    released: bool,
}

/// The volume name of transfer `id`.
fn volume_name(id: &str) -> String {
    format!("gve-xfer-{id}.raw")
}

/// Whether `path` is a staged disk's volume.
pub fn is_staged(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with("gve-xfer-"))
}

/// The serial number of transfer `id`'s disk: `gvex` and 16 hex digits of a hash
/// of the id (a virtio disk carries at most 20 bytes).
pub fn serial_of(id: &str) -> String {
    // FNV-1a, 64 bits: stable across builds, and ids are the host's, not an attacker's.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("gvex{h:016x}")
}

fn check_id(id: &str) -> Result<()> {
    let ok =
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "transfer id {id:?}: 1 to 64 ASCII letters, digits or '-'"
        )))
    }
}

/// The disk device XML of a staged volume.
fn disk_xml(path: &str, target: &str, serial: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='{target}' bus='virtio'/><serial>{serial}</serial></disk>",
        escape(path)
    )
}

/// The first `vdX` name the domain's live definition does not use.
fn free_target(live: &DomainView) -> Result<String> {
    (b'b'..=b'z')
        .map(|c| format!("vd{}", c as char))
        .find(|t| live.disks.iter().all(|d| &d.target != t))
        .ok_or_else(|| Error::unavailable("the VM has no free virtio disk name left".to_string()))
}

impl StagedDisk {
    /// Makes transfer `id`'s volume of `size` bytes rounded up to [`UNIT`] in
    /// `pool` and attaches it to running `vm`.
    pub fn stage(endpoint: &str, pool: &str, vm: &str, id: &str, size: u64) -> Result<StagedDisk> {
        check_id(id)?;
        let capacity = size
            .max(1)
            .checked_next_multiple_of(UNIT)
            .filter(|c| *c <= MAX_SIZE)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "a staged disk of {size} bytes: at most {MAX_SIZE}"
                ))
            })?;
        let conn = Connection::open(endpoint)?;
        let d = conn.lookup_domain(vm)?;
        if d.state != DomainState::Running {
            return Err(Error::invalid_state(format!(
                "VM '{vm}' is not running: a disk is staged only for a running VM"
            )));
        }
        let live = DomainView::parse(&conn.domain_xml(vm, false)?)?;
        let target = free_target(&live)?;
        let name = volume_name(id);
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
             <target><format type='raw'/></target></volume>",
            escape(&name)
        );
        let vol = conn.create_volume(pool, &xml).map_err(|e| {
            if e.kind() == "backend" && e.to_string().to_ascii_lowercase().contains("space") {
                Error::unavailable(format!(
                    "no room for a {capacity}-byte disk in pool '{pool}': {e}"
                ))
            } else {
                e.context(format!("staging disk {name} in pool '{pool}'"))
            }
        })?;
        let serial = serial_of(id);
        if let Err(e) = conn.attach_device(vm, &disk_xml(&vol.path, &target, &serial)) {
            let _ = conn.delete_volume(&vol.path);
            return Err(e.context(format!("attaching staged disk {name} to '{vm}'")));
        }
        Ok(StagedDisk {
            conn,
            vm: vm.to_string(),
            path: vol.path,
            serial,
            target,
            released: false,
        })
    }

    /// Detaches and deletes whatever transfer `id` on `vm` left in `pool`.
    pub fn release_left(endpoint: &str, pool: &str, vm: &str, id: &str) -> Result<()> {
        check_id(id)?;
        let conn = Connection::open(endpoint)?;
        let name = volume_name(id);
        let Some(vol) = conn
            .list_volumes(pool)?
            .into_iter()
            .find(|v| v.name == name)
        else {
            return Ok(());
        };
        let target = match conn.domain_xml(vm, false) {
            Ok(xml) => DomainView::parse(&xml)?
                .disks
                .into_iter()
                .find(|d| d.path == vol.path)
                .map(|d| d.target),
            Err(e) if e.kind() == "not-found" => None,
            Err(e) => return Err(e),
        };
        detach_and_delete(&conn, vm, &vol.path, target.as_deref())
    }
}

impl BulkTransfer for StagedDisk {
    fn serial(&self) -> String {
        self.serial.clone()
    }

    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.conn.upload_volume(&self.path, offset, &data)
    }

    fn read(&mut self, offset: u64, max: u32) -> Result<Vec<u8>> {
        self.conn.download_volume(&self.path, offset, max)
    }

    fn release(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        detach_and_delete(&self.conn, &self.vm, &self.path, Some(&self.target))?;
        self.released = true;
        Ok(())
    }
}

/// How long a release waits for the guest to let go of a detached disk.
const UNPLUG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits (at most [`UNPLUG_WAIT`]) until `vm`'s live definition no longer holds
/// `path`: libvirt returns from a live detach once the unplug is requested (after
/// waiting 5 s for the guest at most), and a disk still plugged would go along
/// with a migration or keep the next copy's slot. A guest that does not let go
/// in time fails the release (`unavailable`) and keeps its volume: the agent
/// keeps the transfer's record and tries again (a stopped VM lets go).
fn wait_unplugged(conn: &Connection, vm: &str, path: &str) -> Result<()> {
    let start = std::time::Instant::now();
    // Within what is left of the call less a second to report it.
    let limit = gve_sdk::deadline::bounded(UNPLUG_WAIT, std::time::Duration::from_secs(1));
    loop {
        let held = match conn.domain_xml(vm, false) {
            Ok(xml) => DomainView::parse(&xml)?
                .disks
                .iter()
                .any(|d| d.path == path),
            Err(e) if e.kind() == "not-found" => false,
            Err(e) => return Err(e.context(format!("waiting for '{vm}' to let go of {path}"))),
        };
        if !held {
            return Ok(());
        }
        if start.elapsed() >= limit {
            let what = format!(
                "the guest of '{vm}' did not let go of staged disk {path} within {} ms of its unplug",
                limit.as_millis()
            );
            return Err(if limit < UNPLUG_WAIT {
                gve_sdk::deadline::over_budget(what)
            } else {
                Error::unavailable(what)
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Detaches `path` from `vm` (when attached as `target`), then deletes it. A disk
/// already gone, a VM no longer running or gone: nothing to detach.
fn detach_and_delete(conn: &Connection, vm: &str, path: &str, target: Option<&str>) -> Result<()> {
    if let Some(target) = target {
        let xml = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
            escape(path)
        );
        match conn.detach_device(vm, &xml) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), "not-found" | "invalid-state") => {}
            // libvirt names a disk it does not hold "not found" in a plain failure.
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(e.context(format!("detaching staged disk {path} from '{vm}'"))),
        }
        // Whatever the detach said (an unplug asked for earlier may still be
        // pending), the volume goes only once the guest has let go of it.
        wait_unplugged(conn, vm, path)?;
    }
    match conn.delete_volume(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == "not-found" => Ok(()),
        Err(e) => Err(e.context(format!("deleting staged disk {path}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_fit_a_virtio_disk_and_differ_by_id() {
        let (a, b) = (serial_of("op-1"), serial_of("op-2"));
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert_eq!(a, serial_of("op-1"));
        assert!(check_id("op-1").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
