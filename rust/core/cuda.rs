//! The few CUDA driver calls the upload stage makes (`upload::Dma` on a real device), resolved at run
//! time from `libcuda.so.1` - the driver library any CUDA process has loaded, torch's included - so
//! the crate links no CUDA and builds and tests on machines without a GPU.
//!
//! The caller (the binding, on the thread where torch made the device's context current) captures
//! that context and a stream torch made (`torch.cuda.Stream.cuda_stream`: a `CUstream` and a
//! `cudaStream_t` are the same handle); the upload thread makes the context current on itself.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::upload::Dma;

type CuResult = c_int;
type Handle = *mut c_void;

/// `CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING`: a waiting thread sleeps rather than spins.
const EVENT_FLAGS: c_uint = 0x1 | 0x2;

struct Driver {
    ctx_get_current: unsafe extern "C" fn(*mut Handle) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(Handle) -> CuResult,
    memcpy_htod_async: unsafe extern "C" fn(u64, *const c_void, usize, Handle) -> CuResult,
    event_create: unsafe extern "C" fn(*mut Handle, c_uint) -> CuResult,
    event_record: unsafe extern "C" fn(Handle, Handle) -> CuResult,
    event_synchronize: unsafe extern "C" fn(Handle) -> CuResult,
    event_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    stream_synchronize: unsafe extern "C" fn(Handle) -> CuResult,
    get_error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

// SAFETY: the table holds only function pointers into the driver, which is thread-safe.
unsafe impl Send for Driver {}
// SAFETY: as above.
unsafe impl Sync for Driver {}

static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

fn driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Device(e.clone()))
}

/// The driver's function `name` in `lib`, as a pointer of type `F`.
///
/// # Safety
/// `F` must be the function-pointer type of the symbol's C signature.
unsafe fn sym<F: Copy>(lib: *mut c_void, name: &CStr) -> std::result::Result<F, String> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    // SAFETY: dlsym with a handle dlopen returned and a NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(format!("the CUDA driver lacks {}", name.to_string_lossy()));
    }
    // SAFETY: a non-null symbol of the driver, read as the pointer type the caller vouches for.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

fn load() -> std::result::Result<Driver, String> {
    // SAFETY: dlopen of the driver library by its NUL-terminated name; each symbol is given the
    // signature the CUDA driver API (cuda.h, CUDA 12 and 13) declares for it.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Err("libcuda.so.1 (the CUDA driver) cannot be loaded".into());
        }
        Ok(Driver {
            ctx_get_current: sym(lib, c"cuCtxGetCurrent")?,
            ctx_set_current: sym(lib, c"cuCtxSetCurrent")?,
            memcpy_htod_async: sym(lib, c"cuMemcpyHtoDAsync_v2")?,
            event_create: sym(lib, c"cuEventCreate")?,
            event_record: sym(lib, c"cuEventRecord")?,
            event_synchronize: sym(lib, c"cuEventSynchronize")?,
            event_destroy: sym(lib, c"cuEventDestroy_v2")?,
            stream_synchronize: sym(lib, c"cuStreamSynchronize")?,
            get_error_name: sym(lib, c"cuGetErrorName")?,
        })
    }
}

fn check(drv: &Driver, r: CuResult, what: &str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string (or leaves it null).
    let name = unsafe {
        if (drv.get_error_name)(r, &mut name) == 0 && !name.is_null() {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        } else {
            format!("CUDA error {r}")
        }
    };
    Err(Error::Device(format!("{what}: {name}")))
}

/// Copies on one CUDA stream of the context current where it was made, an event per ring slot.
pub struct CudaDma {
    drv: &'static Driver,
    ctx: Handle,
    stream: Handle,
    events: Vec<Handle>,
    bound: bool,
}

// SAFETY: the handles are the driver's, usable from any thread once the context is made current
// there (`bind`); the upload thread is the only user after the hand-over.
unsafe impl Send for CudaDma {}

impl CudaDma {
    /// Captures the calling thread's current context and the stream `stream` (a `CUstream`).
    pub fn current(stream: u64, slots: usize) -> Result<Self> {
        let drv = driver()?;
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: the driver writes one handle.
        check(
            drv,
            unsafe { (drv.ctx_get_current)(&mut ctx) },
            "cuCtxGetCurrent",
        )?;
        if ctx.is_null() {
            return Err(Error::Device(
                "no current CUDA context on this thread (initialize CUDA on the device first)"
                    .into(),
            ));
        }
        Ok(CudaDma {
            drv,
            ctx,
            stream: stream as Handle,
            events: vec![std::ptr::null_mut(); slots],
            bound: false,
        })
    }

    fn bind(&mut self) -> Result<()> {
        if !self.bound {
            // SAFETY: a context handle captured from the driver, still alive (torch's primary context).
            check(
                self.drv,
                unsafe { (self.drv.ctx_set_current)(self.ctx) },
                "cuCtxSetCurrent",
            )?;
            self.bound = true;
        }
        Ok(())
    }
}

impl Dma for CudaDma {
    unsafe fn copy(&mut self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `src` is valid until the copy has finished (this method's contract); `dst` is a device
        // buffer the caller keeps allocated for the upload (`Upload::run`'s contract).
        let r = unsafe { (self.drv.memcpy_htod_async)(dst, src.cast(), len, self.stream) };
        check(self.drv, r, "cuMemcpyHtoDAsync")
    }

    fn record(&mut self, slot: usize) -> Result<()> {
        self.bind()?;
        let drv = self.drv;
        let ev = &mut self.events[slot];
        if ev.is_null() {
            // SAFETY: the driver writes one handle.
            check(
                drv,
                unsafe { (drv.event_create)(ev, EVENT_FLAGS) },
                "cuEventCreate",
            )?;
        }
        // SAFETY: an event of this context and the caller's stream.
        check(
            drv,
            unsafe { (drv.event_record)(*ev, self.stream) },
            "cuEventRecord",
        )
    }

    fn wait(&mut self, slot: usize) -> Result<()> {
        let ev = self.events[slot];
        if ev.is_null() {
            return Ok(());
        }
        // SAFETY: an event this object created and recorded.
        check(
            self.drv,
            unsafe { (self.drv.event_synchronize)(ev) },
            "cuEventSynchronize",
        )
    }

    fn finish(&mut self) -> Result<()> {
        if !self.bound {
            return Ok(()); // nothing was queued
        }
        // SAFETY: the caller's stream, alive for the upload.
        let r = unsafe { (self.drv.stream_synchronize)(self.stream) };
        check(self.drv, r, "cuStreamSynchronize")
    }
}

impl Drop for CudaDma {
    fn drop(&mut self) {
        for ev in self.events.drain(..).filter(|e| !e.is_null()) {
            // SAFETY: events this object created; the stream was synchronized by `finish`.
            unsafe { (self.drv.event_destroy)(ev) };
        }
    }
}
