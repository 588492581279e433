//! A plugin name and its current version. The slot outlives unloads: sessions hold
//! the slot, so a session opened before an unload fails with `Unloaded` while the
//! plugin is gone and works again once a version of it is loaded.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::error::{PluginError, Result};
use super::version::Loaded;

/// One plugin name and its current version, if any.
pub struct Slot {
    /// Plugin name.
    pub name: String,
    current: ArcSwapOption<Loaded>,
}

impl Slot {
    /// An empty slot for `name`.
    pub fn new(name: &str) -> Slot {
        Slot {
            name: name.to_string(),
            current: ArcSwapOption::empty(),
        }
    }

    /// The current version, or `NotLoaded` while the plugin is unloaded.
    pub fn current(&self) -> Result<Arc<Loaded>> {
        self.current
            .load_full()
            .ok_or_else(|| PluginError::NotLoaded(self.name.clone()))
    }

    /// Whether a version is loaded.
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// Installs `version`; returns the one it replaces.
    pub fn install(&self, version: Arc<Loaded>) -> Option<Arc<Loaded>> {
        self.current.swap(Some(version))
    }

    /// Removes the current version; returns it.
    pub fn clear(&self) -> Option<Arc<Loaded>> {
        self.current.swap(None)
    }
}
