//! Shard mappings that survive the file being cut short underneath them.
//!
//! A page of a file mapping that lies past the file's end raises SIGBUS when it is touched, and the
//! default action ends the process. Another process truncating (or rewriting shorter) a shard fastq
//! has mapped would so kill a Python process from inside `torch` or a worker thread, with no exception
//! to catch. `GuardedMap` registers every shard mapping with a process-wide SIGBUS handler
//! (`sigaction`, `SA_SIGINFO`). When the fault address lies in a registered mapping, the handler maps
//! anonymous zero pages over the mapping from the faulting page to its end (`MAP_FIXED`; every page
//! there is past the file's new end), records the offset, and returns: the faulting read is restarted
//! and reads zeros. The next check point (`Checkpoint::check`: `get`, `populate`, the end of a
//! quantization job, the end of a load) turns the record into `Error::ShardTruncated` naming the file
//! and the tensor. A fault anywhere else goes to the handler that was installed before fastq's
//! (Rust's stack-overflow handler, Python's `faulthandler`, or the default action).
//!
//! The cost is one `sigaction` per process and one slot store per mapping; nothing on the read path
//! (BENCHMARKS.md, "Files that change underneath"). `FASTQ_SIGBUS_GUARD=0` leaves SIGBUS alone. A
//! handler installed after fastq's first mapping (`faulthandler.enable()` after the first
//! `fastq.open`) replaces fastq's for the whole process.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use memmap2::MmapMut;

/// Mappings registered at once (shards of every open checkpoint, and the views Python still holds).
/// Past this many a mapping is not guarded (a fault in it ends the process, as without fastq).
const SLOTS: usize = 4096;
/// `Slot::base` while a slot is being filled in.
const CLAIMED: usize = usize::MAX;

/// One registered mapping. All fields are atomics: the signal handler reads them without a lock.
struct Slot {
    /// First byte of the mapping; 0 when the slot is free, `CLAIMED` while it is being filled in.
    base: AtomicUsize,
    /// The mapping's length.
    len: AtomicUsize,
    /// One more than the lowest offset the handler zero-filled from; 0 when it never did (every
    /// field starts at 0, so the registry lives in zeroed memory).
    fault: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below, never used alone
const FREE: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    fault: AtomicU64::new(0),
};

static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
/// One past the highest slot ever used (the handler scans no further).
static USED: AtomicUsize = AtomicUsize::new(0);
/// The page size, set when the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action in place before fastq's, to chain to; None until installed (or when disabled).
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

/// A private shard mapping registered with the SIGBUS handler for as long as it lives.
pub struct GuardedMap {
    map: MmapMut,
    slot: Option<usize>,
}

impl GuardedMap {
    /// Registers `map` (installing the handler on first use).
    pub fn new(map: MmapMut) -> Self {
        let slot = if install() && !map.is_empty() {
            register(map.as_ptr() as usize, map.len())
        } else {
            None
        };
        GuardedMap { map, slot }
    }

    /// The offset from which the handler replaced the mapping by zeros (the file was shorter than the
    /// mapping when that page was touched), or None when it never had to.
    pub fn faulted(&self) -> Option<u64> {
        let off = REGISTRY[self.slot?].fault.load(Ordering::Acquire);
        off.checked_sub(1)
    }

    /// Whether faults in this mapping are caught (false when `FASTQ_SIGBUS_GUARD=0`, or every slot is
    /// taken).
    pub fn is_guarded(&self) -> bool {
        self.slot.is_some()
    }

    /// The mapping itself (for `madvise`).
    pub fn mmap(&self) -> &MmapMut {
        &self.map
    }
}

impl Deref for GuardedMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // Unregistered before `map` is unmapped (fields drop after this body): no other mapping can
        // take these addresses while the slot still names them.
        if let Some(i) = self.slot {
            REGISTRY[i].base.store(0, Ordering::Release);
        }
    }
}

fn register(base: usize, len: usize) -> Option<usize> {
    for (i, slot) in REGISTRY.iter().enumerate() {
        if slot
            .base
            .compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            slot.len.store(len, Ordering::Relaxed);
            slot.fault.store(0, Ordering::Relaxed);
            USED.fetch_max(i + 1, Ordering::AcqRel);
            slot.base.store(base, Ordering::Release);
            return Some(i);
        }
    }
    None
}

/// Installs the handler once per process; false when it is disabled or could not be installed.
fn install() -> bool {
    let prev = PREVIOUS.get_or_init(|| {
        if std::env::var_os("FASTQ_SIGBUS_GUARD").is_some_and(|v| v == "0") {
            return None;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid value (no handler, empty mask, no flags); sigaction
        // only writes the current action into `old`. The current action is read (and kept for
        // chaining) before ours replaces it, so a fault in between still finds it.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return None;
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) != 0 {
                return None;
            }
            Some(old)
        }
    });
    prev.is_some()
}

/// The registered mapping holding `addr`: (slot, base, len).
fn find(addr: usize) -> Option<(usize, usize, usize)> {
    let used = USED.load(Ordering::Acquire).min(SLOTS);
    REGISTRY[..used].iter().enumerate().find_map(|(i, s)| {
        let base = s.base.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Relaxed);
        (base != 0 && base != CLAIMED && addr >= base && addr - base < len)
            .then_some((i, base, len))
    })
}

/// The SIGBUS handler. Only async-signal-safe work here: atomics, `mmap`, `sigaction`, `raise`.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler. A positive si_code means
    // the kernel raised it for a fault, and si_addr is then the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code > 0 {
        if let Some((i, base, len)) = find(addr) {
            let page = PAGE.load(Ordering::Relaxed);
            let from = addr & !(page - 1);
            let end = (base + len).div_ceil(page) * page;
            // SAFETY: `from..end` lies inside a live mapping fastq owns (registered, not yet dropped:
            // a dropped map is unregistered before it is unmapped); replacing its pages by anonymous
            // private zero pages keeps the range mapped, readable and writable as before, so every
            // reference into it stays valid; its contents past the file's end were unreadable anyway.
            let p = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let off = (from - base) as u64 + 1;
                let fault = &REGISTRY[i].fault;
                let mut cur = fault.load(Ordering::Acquire);
                while cur == 0 || off < cur {
                    match fault.compare_exchange(cur, off, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => break,
                        Err(now) => cur = now,
                    }
                }
                return;
            }
        }
    }
    // SAFETY: passes the signal on exactly as the kernel handed it to us.
    unsafe { chain(sig, info, ctx, code) }
}

/// Hands a SIGBUS that is not fastq's to the action installed before fastq's.
///
/// # Safety
/// Only from `on_sigbus`, with the arguments the kernel gave it.
unsafe fn chain(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
    code: libc::c_int,
) {
    let prev = PREVIOUS.get().copied().flatten();
    let action = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if action == libc::SIG_IGN && code <= 0 {
        return; // a SIGBUS sent with kill() to a process that ignores it
    }
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // The default action: restore it and let the signal take effect (a fault repeats as soon as
        // the handler returns; a sent signal is sent again). The process ends as it would without us.
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid action; sigaction and raise are
        // async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            if code <= 0 {
                libc::raise(sig);
            }
        }
        return;
    }
    type InfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
    type PlainHandler = extern "C" fn(libc::c_int);
    let flags = prev.map_or(0, |p| p.sa_flags);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO, sa_sigaction holds a three-argument handler (sigaction(2)).
        let f = unsafe { std::mem::transmute::<usize, InfoHandler>(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO, sa_sigaction holds a one-argument handler (sa_handler).
        let f = unsafe { std::mem::transmute::<usize, PlainHandler>(action) };
        f(sig);
    }
}
