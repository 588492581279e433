//! How a running domain is migrated: the libvirt flags that follow from the
//! operator's config (`shared-storage`, `peer-to-peer`) and what the hypervisor
//! can do.

use gve_sdk::libvirt::MigrateFlags;
use gve_sdk::prelude::*;

/// The operator's migration settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct MigrationConfig {
    /// Every destination sees the pool's disks at the same paths.
    pub shared_storage: bool,
    /// The source's libvirtd drives the migration (it connects to the destination).
    pub peer_to_peer: bool,
}

/// What a hypervisor's libvirt driver can do when migrating.
#[derive(Clone, Copy, Debug)]
pub struct Abilities {
    /// The driver's name, for messages.
    pub driver: &'static str,
    /// libvirt wants UNSAFE for disks it cannot prove shared (plain directories).
    pub unsafe_when_shared: bool,
    /// libvirt can copy disks while migrating.
    pub storage_migration: bool,
}

impl MigrationConfig {
    /// Reads `shared-storage` and `peer-to-peer` (both default false).
    pub fn from_config() -> Result<MigrationConfig> {
        Ok(MigrationConfig {
            shared_storage: gve_sdk::config::parse_or("shared-storage", false)?,
            peer_to_peer: gve_sdk::config::parse_or("peer-to-peer", false)?,
        })
    }

    /// The flags of a migration of a running domain (`live`: it keeps running
    /// while its memory is sent); `unsupported` when its disks can neither be
    /// shared nor copied.
    pub fn flags(&self, can: Abilities, live: bool) -> Result<MigrateFlags> {
        let mut flags = MigrateFlags::PERSIST_DESTINATION | MigrateFlags::UNDEFINE_SOURCE;
        if self.shared_storage {
            // The operator says every destination sees the pool's disks at the same
            // paths: libvirt cannot verify that for plain directories, so say so.
            if can.unsafe_when_shared {
                flags |= MigrateFlags::UNSAFE_MIGRATION;
            }
        } else if can.storage_migration {
            flags |= MigrateFlags::NON_SHARED_INCREMENTAL;
        } else {
            return Err(Error::unsupported(format!(
                "the {} driver cannot copy disks while migrating (libvirt has no storage \
                 migration for this hypervisor); set shared-storage = true if every host sees \
                 the storage pool at the same paths",
                can.driver
            )));
        }
        if live {
            flags |= MigrateFlags::LIVE;
        }
        if self.peer_to_peer {
            // The source's libvirtd drives the whole migration itself, with no round
            // trips through this client between the source's last memory pass and
            // the destination's resume.
            flags |= MigrateFlags::PEER_TO_PEER;
        }
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM: Abilities = Abilities {
        driver: "kvm",
        unsafe_when_shared: true,
        storage_migration: true,
    };
    const XEN: Abilities = Abilities {
        driver: "xen",
        unsafe_when_shared: false,
        storage_migration: false,
    };

    #[test]
    fn flags_follow_the_operators_config_and_the_hypervisor() {
        let base = MigrateFlags::PERSIST_DESTINATION | MigrateFlags::UNDEFINE_SOURCE;
        let copy = MigrationConfig::default();
        assert_eq!(
            copy.flags(KVM, true).unwrap(),
            base | MigrateFlags::NON_SHARED_INCREMENTAL | MigrateFlags::LIVE
        );
        let shared = MigrationConfig {
            shared_storage: true,
            peer_to_peer: false,
        };
        assert_eq!(
            shared.flags(KVM, false).unwrap(),
            base | MigrateFlags::UNSAFE_MIGRATION
        );
        assert_eq!(shared.flags(XEN, true).unwrap(), base | MigrateFlags::LIVE);
        let p2p = MigrationConfig {
            peer_to_peer: true,
            ..shared
        };
        assert!(p2p
            .flags(KVM, true)
            .unwrap()
            .contains(MigrateFlags::PEER_TO_PEER | MigrateFlags::LIVE));
        assert!(!shared
            .flags(KVM, true)
            .unwrap()
            .contains(MigrateFlags::PEER_TO_PEER));
        let e = copy.flags(XEN, true).unwrap_err();
        assert_eq!(e.kind(), "unsupported");
        assert!(e.to_string().contains("shared-storage = true"), "{e}");
    }
}
