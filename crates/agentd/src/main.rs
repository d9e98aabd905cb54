//! The `agentd` binary: parse, set up logs, build, run until a signal, map the outcome to an exit code.

use std::process::ExitCode;
use std::time::Duration;

use agentd::cli::{Cli, Command, MigrateArgs, ServeArgs};
use agentd::config::EXIT_CONFIG;
use agentd::startup::Application;
use agentd::{cli, runtime, shutdown, store, telemetry};
use clap::Parser;

/// jemalloc, not glibc's malloc: after a burst of streams ends, it gives most of the memory back to the system (glibc
/// kept all of a 10,000-stream burst; see BENCHMARKS.md, "Allocators").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at its start (its `malloc_conf`; `_RJEM_MALLOC_CONF` in the environment still
/// overrides them). By default it gives freed pages back only while the process allocates, so a process left idle
/// after a burst kept what the burst took: a background thread gives them back, one second after they were freed.
///
/// jemalloc keeps a record for every extent (a slab of blocks of one size, or one large block) it ever had at once,
/// and never gives it back. At the peak of a burst of 10,000 streams it had 17,900 slabs, and 11,300 of them held
/// blocks of three sizes each stream had one or two of: 8 KiB (hyper's read and header buffers on every HTTP/1.1
/// client connection), 1 KiB (the connection's task, 896 bytes since) and a run's task (3.5 KiB then). The first two
/// come 16 and 32 to a slab (128 and 32 KiB) rather than jemalloc's 1 and 4: after such a burst RSS kept about 1 MiB
/// less above its level before (see BENCHMARKS.md, "Allocators"); the 1 KiB setting still about 0.2 MiB less. A run's
/// task is 1,792 bytes now, a class jemalloc already makes 16 to a slab; larger slabs for it leave no less.
#[allow(unsafe_code)] // The symbol jemalloc reads its settings from: a C string, as jemalloc declares it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,\
       slab_sizes:1024-1024:8|8192-8192:32\0"[0];

/// How long the lines logged last may take to be written once the command is done (see [`telemetry`]).
const LOG_FLUSH: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let code = run();
    telemetry::flush(LOG_FLUSH);
    code
}

fn run() -> ExitCode {
    // A setting clap cannot read (a bad number, an unknown mode) is a configuration error like the others: exit 64.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_CONFIG as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = match cli.command {
        // Client commands print for a person; they set up no logging.
        Command::Token(args) => return exit(cli::token(args)),
        command => command,
    };
    match &command {
        Command::Serve(args) => telemetry::init(args.log_format),
        Command::Migrate(args) => telemetry::init(args.log_format),
        Command::Token(_) | Command::Chat(_) => {}
    }
    let runtime = match runtime::builder().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match command {
            Command::Serve(args) => serve(*args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Chat(args) => exit(cli::chat(*args).await),
            Command::Token(_) => unreachable!("handled before the runtime starts"),
        }
    });
    // Whatever is left (idle tasks) is not waited for: the command already finished everything that matters.
    runtime.shutdown_background();
    code
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn config_error(error: impl std::fmt::Display) -> ExitCode {
    tracing::error!(%error, "refusing to start: invalid configuration");
    ExitCode::from(EXIT_CONFIG as u8)
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    let signals = match shutdown::os_signals() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot listen for signals");
            return ExitCode::FAILURE;
        }
    };
    match Application::build(config).await {
        Ok(app) => match app.run(signals).await {
            shutdown::Outcome::Clean => ExitCode::SUCCESS,
            shutdown::Outcome::Forced => exit(shutdown::EXIT_FORCED),
        },
        Err(error) => {
            tracing::error!(%error, "cannot start");
            exit(error.exit_code())
        }
    }
}

async fn migrate(args: MigrateArgs) -> ExitCode {
    let config = match args.store.parse() {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    match store::open(&config).await {
        Ok(store) => {
            store.close().await;
            tracing::info!(backend = config.backend(), "migrations applied");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(backend = config.backend(), %error, "migrations failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// jemalloc's value `name`, of the type jemalloc declares for it.
    fn jemalloc_value<T: Copy + Default>(name: &str) -> T {
        let name = std::ffi::CString::new(name).expect("no NUL in the name");
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: jemalloc writes at most `len` bytes, the size of the type it declares for `name`; it writes nothing
        // else.
        #[allow(unsafe_code)]
        let answer = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&raw mut value).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!((answer, len), (0, std::mem::size_of::<T>()), "{name:?}");
        value
    }

    /// jemalloc took agentd's settings (it ignores one it cannot read, with a warning nobody may see).
    #[test]
    fn jemalloc_runs_with_the_settings_agentd_gives_it() {
        assert!(jemalloc_value::<bool>("opt.background_thread"));
        assert_eq!(jemalloc_value::<isize>("opt.dirty_decay_ms"), 1000);
        assert_eq!(jemalloc_value::<isize>("opt.muzzy_decay_ms"), 0);
        let bins: u32 = jemalloc_value("arenas.nbins");
        for (size, blocks, slab) in [(1024, 32, 32 << 10), (8192, 16, 128 << 10)] {
            let bin = (0..bins)
                .find(|bin| jemalloc_value::<usize>(&format!("arenas.bin.{bin}.size")) == size)
                .unwrap_or_else(|| panic!("a class of {size}-byte blocks"));
            assert_eq!(
                jemalloc_value::<u32>(&format!("arenas.bin.{bin}.nregs")),
                blocks,
                "{size}"
            );
            assert_eq!(
                jemalloc_value::<usize>(&format!("arenas.bin.{bin}.slab_size")),
                slab,
                "{size}"
            );
        }
    }

    /// jemalloc's map of its pages is built for the 48-bit addresses Linux gives a process (`.cargo/config.toml`), not
    /// for the widest the processor has.
    #[test]
    fn jemalloc_is_built_for_the_addresses_linux_gives_a_process() {
        assert_eq!(option_env!("JEMALLOC_SYS_WITH_LG_VADDR"), Some("48"));
    }

    /// Sets jemalloc's `name` to `value`, of the type jemalloc declares for it.
    fn set_jemalloc_value<T: Copy>(name: &str, mut value: T) {
        let name = std::ffi::CString::new(name).expect("no NUL in the name");
        // SAFETY: jemalloc reads `size_of::<T>()` bytes of `value`, the size of the type it declares for `name`; it
        // writes nothing.
        #[allow(unsafe_code)]
        let answer = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&raw mut value).cast(),
                std::mem::size_of::<T>(),
            )
        };
        assert_eq!(answer, 0, "{name:?}");
    }

    /// The bytes of freed blocks the threads of arena `arena` cache, as of now.
    fn cached_bytes(arena: u32) -> usize {
        set_jemalloc_value("epoch", 1_u64);
        jemalloc_value(&format!("stats.arenas.{arena}.tcache_bytes"))
    }

    /// A worker gives its cache back each time it parks, however soon after the last time: it may stay parked for as
    /// long as the process is idle.
    #[test]
    fn a_worker_gives_its_cache_back_each_time_it_parks() {
        let runtime = runtime::builder()
            .worker_threads(1)
            .build()
            .expect("a runtime");
        gives_its_cache_back_each_time_it_parks(runtime.handle());
    }

    /// So does the store's thread, idle between the bursts it commits.
    #[test]
    fn the_stores_thread_gives_its_cache_back_each_time_it_parks() {
        gives_its_cache_back_each_time_it_parks(runtime::store());
    }

    /// The one worker of `runtime` caches freed blocks and gives them all back once it parks, three times over. It
    /// allocates in an arena of its own here, so that its cache is the only one counted.
    fn gives_its_cache_back_each_time_it_parks(runtime: &tokio::runtime::Handle) {
        let arena: u32 = jemalloc_value("arenas.create");
        for round in 0..3 {
            let cached = runtime
                .block_on(runtime.spawn(async move {
                    set_jemalloc_value("thread.arena", arena);
                    let blocks: Vec<Box<[u8; 96]>> = (0..1000).map(|_| Box::new([1; 96])).collect();
                    drop(std::hint::black_box(blocks));
                    cached_bytes(arena)
                }))
                .expect("the task ran");
            assert!(
                cached > 0,
                "round {round}: the worker cached nothing to give back"
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while cached_bytes(arena) > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the parked worker still caches {} bytes",
                    cached_bytes(arena)
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
