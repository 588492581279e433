//! The process heap: giving freed memory back to the system after work that
//! allocated much at once (glibc's allocator keeps freed memory for reuse, so a
//! listing of 100,000 VMs read once would otherwise stay in the resident set).

/// Returns the heap's free memory to the system where the allocator keeps it
/// (glibc); elsewhere nothing to do.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) only releases memory the allocator holds free; it
    // touches no allocation of the program.
    unsafe {
        libc::malloc_trim(0);
    }
}
