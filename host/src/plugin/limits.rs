//! Per-instance resource limits: the memory cap (a `ResourceLimiter` that remembers
//! what it refused, so the error can say so) and the call deadline.

use std::time::Instant;

/// Most table elements an instance may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Why a call was stopped by the sandbox rather than failing on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It ran past its deadline.
    Deadline,
    /// It asked for more memory than its cap (bytes asked).
    Memory(u64),
}

/// The limiter and deadline kept in each store.
#[derive(Debug)]
pub struct Limiter {
    memory_cap: usize,
    /// When the current call must end, if a call is running.
    pub deadline: Option<Instant>,
    /// Set when the sandbox stopped the current call.
    pub stopped: Option<Stopped>,
}

impl Limiter {
    /// A limiter with a memory cap in bytes.
    pub fn new(memory_cap: usize) -> Limiter {
        Limiter {
            memory_cap,
            deadline: None,
            stopped: None,
        }
    }

    /// The memory cap in bytes.
    pub fn memory_cap(&self) -> usize {
        self.memory_cap
    }

    /// Called by the epoch callback: has the current call's deadline passed?
    pub fn deadline_passed(&mut self) -> bool {
        match self.deadline {
            Some(d) if Instant::now() >= d => {
                self.stopped = Some(Stopped::Deadline);
                true
            }
            _ => false,
        }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.stopped = Some(Stopped::Memory(desired as u64));
            return Err(wasmtime::format_err!(
                "memory cap of {} bytes exceeded: asked for {desired}",
                self.memory_cap
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        // A component instance is several core instances (module, WASI adapter, shims).
        16
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        4
    }
}
