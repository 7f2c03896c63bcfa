//! The `r1pipe` command line.

mod cli;

fn main() {
    // SAFETY: signal dispositions and the umask are set at startup, before any threads exist.
    unsafe {
        // A child that exits while r1pipe writes to it (a reward program, a tool) must be
        // that child's failure, reported as such, not a SIGPIPE that kills r1pipe and the
        // stages beside it: writes to a closed pipe fail with EPIPE instead.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // A file-size limit (ulimit -f) then fails the write with an error we report,
        // as a full disk does, instead of killing the process mid-write.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        // Nothing r1pipe creates (cache objects, work folders, logs) is writable by the
        // group or others, whatever the umask it was started with.
        let old = libc::umask(0o022);
        libc::umask(old | 0o022);
    }
    // `r1pipe show … | head`: stdout closed early ends r1pipe quietly, as other Unix
    // tools end (what SIGPIPE did), instead of a panic message.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info)
    }));
    r1pipe::common::memory::tune_allocator();
    // Chat templates render in a process of their own, forked now while r1pipe is small.
    r1pipe::model::tokenizer::start_template_process();
    if let Err(e) = r1pipe::kernels::check_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    std::process::exit(cli::main());
}
