//! What a long loop of the ML core (training, evaluation) needs from whoever
//! runs it: a folder that survives interruption, a cancel token, progress
//! bars. The runner's stage context is one host; a plain folder is another
//! (tests, library use); a subfolder of a host is a third (evaluation during
//! training: its own partial results, the stage's display).

use std::path::PathBuf;

use super::CancelToken;

pub trait Host {
    /// Survives interruption: checkpoints, logs and partial results live here.
    fn work_dir(&self) -> PathBuf;
    fn cancel(&self) -> &CancelToken;
    /// A progress bar of `len` `unit`s with rate and ETA (hidden where nobody watches).
    fn progress(&self, len: u64, unit: &str) -> indicatif::ProgressBar;
    /// A line for whoever watches the run (a training step's numbers, a
    /// warning): above the progress bars, or plain on stderr where there are
    /// none, and not at all when the run was asked to be quiet.
    fn say(&self, line: &str);
    /// A training step's log line was written (the trackers of `report_to`
    /// take it from here). Default: nothing else.
    fn logged(&self, _step: u64, _line: &serde_json::Value) {}
}

/// A host for tests and library use: a folder, a token, no display.
pub struct FolderHost {
    pub dir: PathBuf,
    pub cancel: CancelToken,
}

impl Host for FolderHost {
    fn work_dir(&self) -> PathBuf {
        self.dir.clone()
    }
    fn cancel(&self) -> &CancelToken {
        &self.cancel
    }
    fn progress(&self, len: u64, unit: &str) -> indicatif::ProgressBar {
        indicatif::ProgressBar::hidden().with_position(0).with_message(format!("0/{len} {unit}"))
    }
    /// No display here: the line goes to the diagnostics (`RUST_LOG=info`).
    fn say(&self, line: &str) {
        tracing::info!("{line}");
    }
}

/// A folder inside another host's work folder, with that host's cancel token
/// and progress display.
pub struct SubfolderHost<'a> {
    pub host: &'a dyn Host,
    pub dir: PathBuf,
}

impl Host for SubfolderHost<'_> {
    fn work_dir(&self) -> PathBuf {
        self.dir.clone()
    }
    fn cancel(&self) -> &CancelToken {
        self.host.cancel()
    }
    fn progress(&self, len: u64, unit: &str) -> indicatif::ProgressBar {
        self.host.progress(len, unit)
    }
    fn say(&self, line: &str) {
        self.host.say(line)
    }
}
