//! The one wasmtime engine of a process: pooling allocator, epoch interruption
//! driven by a ticker thread, and component-model settings chosen for call speed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::error::{PluginError, Result};

/// How often the epoch advances; the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Engine-wide settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Most component instances alive at once, over all plugins.
    pub total_instances: u32,
    /// Ceiling for any plugin's memory cap, MiB.
    pub max_memory_mib: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            total_instances: 256,
            max_memory_mib: 1024,
        }
    }
}

/// The engine plus the thread that advances its epoch.
pub struct PluginEngine {
    engine: Engine,
    settings: EngineSettings,
    stop: Arc<AtomicBool>,
}

impl PluginEngine {
    /// Builds the engine and starts the epoch ticker.
    pub fn new(settings: EngineSettings) -> Result<PluginEngine> {
        let engine = Engine::new(&config(&settings))
            .map_err(|e| PluginError::runtime("<engine>", "create the engine", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (weak, flag) = (engine.weak(), stop.clone());
        std::thread::Builder::new()
            .name("gve-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| PluginError::Config(format!("cannot start the epoch thread: {e}")))?;
        Ok(PluginEngine {
            engine,
            settings,
            stop,
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn config(settings: &EngineSettings) -> Config {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    // Every call goes through the plain p2 path: the concurrency machinery costs
    // 1.6-2.9 us per call against ~0.4 us without (shared/notes/wasmtime.md).
    cfg.concurrency_support(false);
    cfg.epoch_interruption(true);
    cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Reserve all a 32-bit memory can address (4 GiB) with a guard after it, so
    // that compiled code needs no bounds check before each load and store (an
    // access past the memory's size hits unmapped pages and traps): with the
    // reservation at the cap, every access was checked. Address space only:
    // about 2 TiB for 512 memories of the 128 TiB a process has, no memory
    // (the cap is max_memory_size below).
    let max_bytes = settings.max_memory_mib << 20;
    cfg.memory_reservation(max_bytes.max(4 << 30));
    cfg.memory_guard_size(32 << 20);
    let mut pool = PoolingAllocationConfig::default();
    let n = settings.total_instances;
    pool.total_component_instances(n);
    // A component instance is a handful of core instances (the module, the WASI
    // adapter, shims) each with at most a memory or a table.
    pool.total_core_instances(n * 4);
    pool.total_memories(n * 2);
    pool.total_tables(n * 4);
    pool.max_memory_size((settings.max_memory_mib as usize) << 20);
    pool.max_component_instance_size(1 << 20);
    pool.max_core_instance_size(1 << 20);
    pool.max_memories_per_component(4);
    pool.max_tables_per_component(8);
    cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    cfg
}
