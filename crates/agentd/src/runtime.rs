//! The async runtimes agentd runs on: the workers that serve requests and drive runs, and, with PostgreSQL as the
//! store, one thread of the store's own for its queues (run starts, run ends, the run log's writer and its listener).
//!
//! PostgreSQL's queues run apart from the workers for the sake of memory. What the store receives passes through 8 KiB
//! buffers the database driver fills from start to end (PostgreSQL's messages; a new one as each fills), freed on the
//! thread that read them. On a worker, the next 8 KiB blocks that thread allocated were likely these, every page of
//! them resident, and what a worker allocates at 8 KiB is mostly hyper's buffers for client connections, of which a
//! parked stream touches a page or so. With 19,500 streams parked (2,000 a second), PostgreSQL took 17.7 KiB per
//! stream against SQLite's 16.6 (whose driver runs on threads of its own); with the queues on their own thread, 16.6
//! (at 500 a second 19.0 before, 16.1 after; see BENCHMARKS.md, "What limits the memory per stream").

use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

/// A multi-threaded runtime, every worker of which gives its allocator cache back as it parks.
pub fn builder() -> Builder {
    let mut builder = Builder::new_multi_thread();
    builder.enable_all().on_thread_park(flush_thread_cache);
    builder
}

/// The store's runtime: one worker thread, started on first use and kept for as long as the process runs (a store
/// opened again, as tests do, queues on the same thread).
pub fn store() -> &'static Handle {
    static STORE: OnceLock<Runtime> = OnceLock::new();
    STORE
        .get_or_init(|| {
            builder()
                .worker_threads(1)
                .thread_name("agentd-store")
                .build()
                .expect("a thread for the store's queues starts")
        })
        .handle()
}

/// The runtime a store's queues run on (run starts, run ends, the run log's writer and its listener): PostgreSQL's on
/// the store's own thread ([`store`], for the sake of memory: see above), SQLite's on the runtime that opened the
/// store, the workers. SQLite's driver reads and writes on threads of its own, so none of its buffers is freed on a
/// worker either way, and on the store's thread each start, end and group commit crossed two more threads: from the
/// worker to the store's thread and back, besides to SQLite's and back. The idle run start on SQLite, p99 1.44–1.63
/// ms with the queues on the store's thread, 0.93–1.05 on the workers (BENCHMARKS.md, "The real path").
pub fn for_store(postgres: bool) -> Handle {
    if postgres {
        store().clone()
    } else {
        Handle::current()
    }
}

/// A worker thread's jemalloc cache of freed blocks, given back to the shared arenas each time the thread parks.
/// Each thread keeps up to a few hundred freed blocks per size for its next allocations and only trims them as it
/// allocates, and every cached block keeps the slab it lies in resident: a worker left idle kept its last burst's
/// cache, and the pages it pins, for good. A thread that parks may stay parked for as long as the process is idle,
/// so no park may skip it (when one within a second of the last did, one worker in two or three kept 1.5 MB of
/// blocks after a burst, pinning 9 MiB; see BENCHMARKS.md, "Allocators"). The store's thread likewise: without it,
/// a burst left 2 MiB more behind.
fn flush_thread_cache() {
    // jemalloc refuses only for a thread without a cache, which has nothing to give back (and where agentd's library
    // runs without jemalloc as its allocator, as in its tests, jemalloc's caches hold nothing).
    // SAFETY: `thread.tcache.flush` reads and writes no value; its name is a C string.
    #[allow(unsafe_code)]
    let _ = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
}
