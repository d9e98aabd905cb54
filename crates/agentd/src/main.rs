//! The `agentd` binary: parse, set up logs, build, run until a signal, map the outcome to an exit code.

use std::cell::Cell;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentd::cli::{Cli, Command, MigrateArgs, ServeArgs};
use agentd::config::EXIT_CONFIG;
use agentd::startup::Application;
use agentd::{cli, shutdown, store, telemetry};
use clap::Parser;

/// jemalloc, not glibc's malloc: after a burst of streams ends, it gives most of the memory back to the system (glibc
/// kept all of a 10,000-stream burst; see BENCHMARKS.md, "Allocators").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at its start (its `malloc_conf`; `_RJEM_MALLOC_CONF` in the environment still
/// overrides them). By default it gives freed pages back only while the process allocates, so a process left idle
/// after a burst kept what the burst took: a background thread gives them back, one second after they were freed.
///
/// Blocks of 8 KiB come four to a 32 KiB slab rather than one to each. Every HTTP/1.1 client connection holds two
/// (hyper's read and header buffers), and jemalloc keeps a record for every slab it ever had at once, which it never
/// gives back: after a burst of 10,000 streams that was 2 MiB more kept (see BENCHMARKS.md, "Allocators").
#[allow(unsafe_code)] // The symbol jemalloc reads its settings from: a C string, as jemalloc declares it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 =
    &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,slab_sizes:8192-8192:8\0"[0];

/// A worker thread's jemalloc cache of freed blocks, given back to the shared arenas when the thread goes idle, at
/// most once a second. Each thread keeps up to a few hundred freed blocks per size for its next allocations, and
/// only trims them as it allocates: an idle process kept the cache of its last burst, and the pages it pins.
fn flush_thread_cache_when_idle() {
    let _ = flush_thread_cache_at_most_every_second();
}

/// Flushes the calling thread's cache unless it did less than a second ago: jemalloc's answer (0 when done), or
/// `None` when it was too soon.
fn flush_thread_cache_at_most_every_second() -> Option<i32> {
    thread_local! {
        static FLUSHED: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    FLUSHED.with(|flushed| {
        let now = Instant::now();
        if flushed
            .get()
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return None;
        }
        flushed.set(Some(now));
        // SAFETY: `thread.tcache.flush` reads and writes no value; its name is a C string.
        #[allow(unsafe_code)]
        let answer = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"thread.tcache.flush".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        Some(answer)
    })
}

fn main() -> ExitCode {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(flush_thread_cache_when_idle)
        .build()
    {
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
        let eight = (0..bins)
            .find(|bin| jemalloc_value::<usize>(&format!("arenas.bin.{bin}.size")) == 8192)
            .expect("a class of 8 KiB blocks");
        assert_eq!(
            jemalloc_value::<u32>(&format!("arenas.bin.{eight}.nregs")),
            4
        );
        assert_eq!(
            jemalloc_value::<usize>(&format!("arenas.bin.{eight}.slab_size")),
            32 << 10
        );
    }

    #[test]
    fn an_idle_thread_gives_its_cache_back_at_most_once_a_second() {
        assert_eq!(flush_thread_cache_at_most_every_second(), Some(0));
        assert_eq!(flush_thread_cache_at_most_every_second(), None);
    }
}
