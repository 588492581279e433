//! Precompiled components cached on disk, keyed by the component's hash and the
//! engine's compatibility hash, so a restart deserializes instead of recompiling.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::error::{PluginError, Result};

/// Where a component came from: compiled now or loaded from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Compiled from the component bytes.
    Compiled,
    /// Deserialized from a cached artifact.
    Cached,
}

/// The on-disk artifact cache.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
}

/// Feeds `Hash` output into SHA-256 (the engine exposes its compatibility hash as `impl Hash`).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ArtifactCache {
    /// A cache in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<ArtifactCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| PluginError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(ArtifactCache { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key of `bytes` for `engine`.
    pub fn key(engine: &Engine, bytes: &[u8]) -> String {
        let mut h = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        h.0.update(Sha256::digest(bytes));
        hex::encode(h.0.finalize())
    }

    /// Loads `bytes` as a component: from the cache when a matching artifact exists,
    /// otherwise compiles it and stores the artifact (atomically: write then rename).
    pub fn load(&self, engine: &Engine, plugin: &str, bytes: &[u8]) -> Result<(Component, Origin)> {
        let path = self.dir.join(format!("{}.cwasm", Self::key(engine, bytes)));
        if path.exists() {
            // SAFETY: files in the cache directory are written only by this function,
            // from `Engine::precompile_component`, under a key that includes the
            // engine's compatibility hash. A stale or damaged file fails to
            // deserialize and is recompiled below.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok((c, Origin::Cached)),
                Err(e) => {
                    tracing::warn!(plugin, path = %path.display(), "discarding cached artifact: {e:#}")
                }
            }
        }
        let runtime = |action, e| PluginError::runtime(plugin, action, e);
        let artifact = engine
            .precompile_component(bytes)
            .map_err(|e| runtime("compile", e))?;
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let io = |source| PluginError::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, &artifact).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        // SAFETY: the artifact was produced just above by this engine.
        let c =
            unsafe { Component::deserialize(engine, &artifact) }.map_err(|e| runtime("load", e))?;
        Ok((c, Origin::Compiled))
    }
}
