//! The `r1pipe` command line.

mod cli;

fn main() {
    // Behave like other Unix tools when stdout is closed early (`r1pipe … | head`):
    // end quietly instead of panicking on a broken pipe.
    // SAFETY: setting a signal disposition to its default at startup, before any threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // A file-size limit (ulimit -f) then fails the write with an error we report,
        // as a full disk does, instead of killing the process mid-write.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    r1pipe::common::memory::tune_allocator();
    if let Err(e) = r1pipe::kernels::check_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    std::process::exit(cli::main());
}
