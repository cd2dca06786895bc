// jemalloc instead of glibc's malloc. Automerge makes many small, short-lived allocations from
// several threads: with glibc the daemon imported 100,000 records at ~9,700/s and its RSS rose to
// 164 MiB under random reads (freed memory held in per-thread arenas); with jemalloc configured
// below, ~14,000/s and a 125 MiB peak settling near 85 MiB. benches/README.md has the runs.
// (mimalloc was as fast, but its arena commit setting is only honoured from the environment.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads this at start-up: two arenas (two cores), and a background thread that returns
/// freed pages to the OS within half a second, so RSS tracks what the daemon actually holds.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] =
    b"background_thread:true,narenas:2,dirty_decay_ms:500,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
