//! The wasmtime engine of a plugin host: pooling allocator, epoch interruption
//! driven by a ticker thread, and settings chosen for call and code speed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::error::{PluginError, Result};

/// How often the epoch advances; the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Address space the process's engines may reserve for linear memories that
/// need no bounds checks (4 GiB each): 48 of the 128 TiB a process has, some 23
/// engines at the default settings. A process with more (a test binary running
/// many agents at once) builds the rest with checked accesses, which reserve
/// only each memory's cap.
const UNCHECKED_BUDGET: u64 = 48 << 40;

/// What the live engines reserved of [`UNCHECKED_BUDGET`].
static UNCHECKED_RESERVED: AtomicU64 = AtomicU64::new(0);

/// The guard after each linear memory.
const GUARD: u64 = 32 << 20;

/// What a 32-bit linear memory can address.
const FOUR_GIB: u64 = 4 << 30;

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
    /// What this engine took of [`UNCHECKED_BUDGET`] (0: its accesses are checked).
    unchecked: u64,
}

/// Takes `bytes` of [`UNCHECKED_BUDGET`], if that much is left.
fn take_unchecked(bytes: u64) -> bool {
    UNCHECKED_RESERVED
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
            r.checked_add(bytes).filter(|&n| n <= UNCHECKED_BUDGET)
        })
        .is_ok()
}

impl PluginEngine {
    /// Builds the engine and starts the epoch ticker.
    pub fn new(settings: EngineSettings) -> Result<PluginEngine> {
        let need = memory_slots(&settings) * (FOUR_GIB + GUARD);
        let unchecked = if take_unchecked(need) {
            need
        } else {
            tracing::info!(
                "plugin engine: this process's other engines hold the address space \
                 for unchecked memory accesses; this one checks each access (slower)"
            );
            0
        };
        let engine = Engine::new(&config(&settings, unchecked > 0)).map_err(|e| {
            UNCHECKED_RESERVED.fetch_sub(unchecked, Ordering::AcqRel);
            PluginError::runtime("<engine>", "create the engine", e)
        })?;
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
            unchecked,
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
        UNCHECKED_RESERVED.fetch_sub(self.unchecked, Ordering::AcqRel);
    }
}

/// Linear memories the pool holds: a component instance is a handful of core
/// instances (the module, the WASI adapter, shims), each with at most a memory.
fn memory_slots(settings: &EngineSettings) -> u64 {
    u64::from(settings.total_instances) * 2
}

/// The engine's configuration; `unchecked`: memories reserved whole, so that
/// compiled code needs no bounds check before each load and store.
fn config(settings: &EngineSettings, unchecked: bool) -> Config {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    // Every call goes through the plain p2 path: the concurrency machinery costs
    // 1.6-2.9 us per call against ~0.4 us without (shared/notes/wasmtime.md).
    cfg.concurrency_support(false);
    cfg.epoch_interruption(true);
    cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Unchecked: reserve all a 32-bit memory can address (4 GiB) with a guard
    // after it, so that compiled code needs no bounds check before each load and
    // store (an access past the memory's size hits unmapped pages and traps);
    // about 2 TiB of address space for 512 memories, none of it memory (the cap
    // is max_memory_size below). Checked: reserve the cap, and every access is
    // compared with the memory's size (measured 8-15% slower on a call working
    // in linear memory, bench/results/plugin.md).
    let max_bytes = settings.max_memory_mib << 20;
    cfg.memory_reservation(if unchecked {
        max_bytes.max(FOUR_GIB)
    } else {
        max_bytes
    });
    cfg.memory_guard_size(GUARD);
    let mut pool = PoolingAllocationConfig::default();
    let n = settings.total_instances;
    pool.total_component_instances(n);
    // A component instance is a handful of core instances (the module, the WASI
    // adapter, shims) each with at most a memory or a table.
    pool.total_core_instances(n * 4);
    pool.total_memories(u32::try_from(memory_slots(settings)).unwrap_or(u32::MAX));
    pool.total_tables(n * 4);
    pool.max_memory_size((settings.max_memory_mib as usize) << 20);
    pool.max_component_instance_size(1 << 20);
    pool.max_core_instance_size(1 << 20);
    pool.max_memories_per_component(4);
    pool.max_tables_per_component(8);
    cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_beyond_the_address_space_budget_check_their_memory_accesses() {
        let small = EngineSettings {
            total_instances: 2,
            max_memory_mib: 64,
        };
        // Hold what is left of the budget (other tests' engines come and go).
        let held = loop {
            let left = UNCHECKED_BUDGET - UNCHECKED_RESERVED.load(Ordering::Acquire);
            if take_unchecked(left) {
                break left;
            }
        };
        let checked = PluginEngine::new(small).unwrap();
        assert_eq!(checked.unchecked, 0);
        drop(checked);
        UNCHECKED_RESERVED.fetch_sub(held, Ordering::AcqRel);
        let unchecked = PluginEngine::new(small).unwrap();
        assert_eq!(unchecked.unchecked, 4 * (FOUR_GIB + GUARD));
        assert!(
            !take_unchecked(UNCHECKED_BUDGET + 1),
            "never more than the budget"
        );
    }
}
