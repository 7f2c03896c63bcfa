//! Fault injection for tests: named points where a test build (`--features
//! test-kinds`) aborts the process, as a kill -9 would, when `R1PIPE_FAULT`
//! names the point. In other builds a point compiles to nothing.

/// Abort here when `R1PIPE_FAULT` is `name` (test builds only).
#[inline]
pub fn point(name: &str) {
    #[cfg(feature = "test-kinds")]
    if std::env::var("R1PIPE_FAULT").is_ok_and(|v| v == name) {
        eprintln!("fault injected at `{name}`: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "test-kinds"))]
    let _ = name;
}
