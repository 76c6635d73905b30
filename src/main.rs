//! The `streamrecon` command line.

mod cli;

// Returns freed memory to the system; glibc's per-thread arenas kept hundreds of MiB after a
// service's sessions had closed (benches/serve_load.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    streamrecon_models::init_threads();
    // A service's log says when; a run's is read as it goes.
    let service = matches!(std::env::args().nth(1).as_deref(), Some("serve" | "worker"));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(service.then_some(env_logger::TimestampPrecision::Millis))
        .format_target(false)
        .init();
    match cli::main() {
        Ok(code) => code,
        Err(e) => {
            // One line per cause, outermost first.
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
