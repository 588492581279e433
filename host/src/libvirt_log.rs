//! libvirt's errors go to gve's log, not to stderr. libvirt's default error
//! handler prints every error it raises ("libvirt: XML-RPC error : Failed to
//! connect socket ...") even when the caller expects it (a probe for a daemon, a
//! pool or a domain that may not exist). Every such error also comes back to gve
//! as a `virt::error::Error`, and the code that made the call reports it at the
//! level it deserves; the handler installed here records libvirt's own report at
//! `debug` (target `libvirt`, shown with `GVE_LOG=libvirt=debug`).

use std::ffi::CStr;
use std::sync::Once;

/// Installs the handler (once per process; later calls do nothing).
pub fn route_to_log() {
    static ONCE: Once = Once::new();
    // SAFETY: `to_log` matches libvirt's `virErrorFunc` and only reads the error
    // libvirt hands it for the duration of the call.
    ONCE.call_once(|| unsafe { virt_sys::virSetErrorFunc(std::ptr::null_mut(), Some(to_log)) });
}

unsafe extern "C" fn to_log(_user: *mut libc::c_void, err: virt_sys::virErrorPtr) {
    if err.is_null() {
        return;
    }
    // SAFETY: libvirt passes a valid error for the duration of this call; its
    // message is a NUL-terminated string or null.
    let (code, domain, message) = unsafe {
        let e = &*err;
        let message = if e.message.is_null() {
            String::new()
        } else {
            CStr::from_ptr(e.message).to_string_lossy().into_owned()
        };
        (e.code, e.domain, message)
    };
    tracing::debug!(target: "libvirt", code, domain, "{message}");
}
