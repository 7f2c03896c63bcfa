//! Programs r1pipe starts and talks to in JSON lines (reward programs, tools),
//! run under one supervisor:
//!
//! - their own process group, so a Ctrl-C in the terminal reaches r1pipe only
//!   (which checkpoints, then stops them), and a kill takes their children too;
//! - killed whole when the supervisor is dropped (the stage ended, failed or was
//!   cancelled), and, if r1pipe itself is killed, by the kernel (the program:
//!   `PR_SET_PDEATHSIG`) and within a second by a watcher in the group (its
//!   children);
//! - stdin written by a thread of its own, so a program that never reads cannot
//!   block r1pipe past the deadline that covers writing and reading;
//! - stdout read in lines of at most [`Limits::line_bytes`], stderr kept as its
//!   last lines, each cut to [`Limits::stderr_line_bytes`]: a program that
//!   floods either cannot exhaust r1pipe's memory;
//! - a write to a program that exited is that program's failure (EPIPE;
//!   r1pipe ignores SIGPIPE), reported with how it ended and its stderr.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How much of a program's output r1pipe keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest stdout line (a reply); a longer one fails the program.
    pub line_bytes: usize,
    /// How many of its last stderr lines are kept (shown when it fails).
    pub stderr_lines: usize,
    /// Each kept stderr line is cut to this many bytes.
    pub stderr_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { line_bytes: 16 << 20, stderr_lines: 20, stderr_line_bytes: 2000 }
    }
}

/// A line of stdout, or why there is none.
enum Out {
    Line(String),
    TooLong(usize),
    Failed(std::io::Error),
}

/// A program running under supervision.
pub struct Supervised {
    child: Child,
    /// Lines to write to its stdin, and the outcome of each write.
    to_stdin: Option<Sender<Vec<u8>>>,
    written: Receiver<std::io::Result<()>>,
    lines: Receiver<Out>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
    watcher: Option<Child>,
    ended: bool,
}

impl Supervised {
    /// Start `command` (program and arguments) in `dir`.
    pub fn spawn(command: &[String], dir: &Path, limits: Limits) -> Result<Supervised> {
        let (program, args) = command.split_first().ok_or_else(|| anyhow!("the command is empty"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(dir).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group (a terminal's Ctrl-C goes to r1pipe's group only).
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Killed by the kernel if r1pipe dies first (kill -9 included).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start `{program}` in {}", dir.display()))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            bail!("the program's standard streams could not be opened");
        };
        let pgid = child.id() as i32;
        let watcher = spawn_watcher(pgid);

        let (to_stdin, pending) = mpsc::channel::<Vec<u8>>();
        let (done, written) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdin = stdin;
            for bytes in pending {
                let r = stdin.write_all(&bytes).and_then(|_| stdin.flush());
                let failed = r.is_err();
                if done.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || read_lines(stdout, limits.line_bytes, tx));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let sink = tail.clone();
        let stderr_reader = std::thread::spawn(move || keep_tail(stderr, limits, &sink));
        Ok(Supervised {
            child,
            to_stdin: Some(to_stdin),
            written,
            lines,
            stderr: tail,
            stderr_reader: Some(stderr_reader),
            watcher,
            ended: false,
        })
    }

    /// Write `line` (a newline is added) and read one line back, all before `deadline`.
    pub fn exchange(&mut self, line: &str, deadline: Instant, timeout_hint: &str) -> Result<String> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        let Some(to_stdin) = &self.to_stdin else { bail!("its input is closed") };
        if to_stdin.send(bytes).is_err() {
            bail!("it stopped reading its input: {}", self.how_it_ended());
        }
        let left = |d: Instant| d.saturating_duration_since(Instant::now());
        match self.written.recv_timeout(left(deadline)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("writing the batch to it failed ({}): {}", plain_io(&e), self.how_it_ended()),
            Err(RecvTimeoutError::Timeout) => {
                bail!("it did not read its input within the time limit ({timeout_hint})")
            }
            Err(RecvTimeoutError::Disconnected) => bail!("its input closed: {}", self.how_it_ended()),
        }
        match self.lines.recv_timeout(left(deadline)) {
            Ok(Out::Line(l)) => Ok(l),
            Ok(Out::TooLong(n)) => bail!("it wrote a line longer than {n} bytes; the most a reply may be"),
            Ok(Out::Failed(e)) => bail!("reading its reply failed: {}", plain_io(&e)),
            Err(RecvTimeoutError::Timeout) => bail!("it did not answer within the time limit ({timeout_hint})"),
            // The reader saw the end of stdout: the exit usually follows at once.
            Err(RecvTimeoutError::Disconnected) => {
                bail!("it closed its output without answering: {}", self.how_it_ended())
            }
        }
    }

    /// How the program ended (waiting up to 2 s for it to), in words.
    fn how_it_ended(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return ended_in_words(s),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => return "it is still running".into(),
                Err(e) => return format!("its state is unknown ({e})"),
            }
        }
    }

    /// Stop it (its whole process group) and return its last stderr lines, all of
    /// them: the reader is given a moment to drain what the program wrote before it ended.
    pub fn stop(&mut self) -> Vec<String> {
        self.kill_group();
        if let Some(h) = self.stderr_reader.take() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        self.stderr.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }

    fn kill_group(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.to_stdin = None;
        // SAFETY: signalling the process group this supervisor created (its leader's id).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut w) = self.watcher.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// A watcher in the program's group: when r1pipe's process is gone (killed
/// before it could stop the program), it kills the group, the program's own
/// children included (they do not inherit the kernel's parent-death signal).
fn spawn_watcher(pgid: i32) -> Option<Child> {
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill -KILL -{pgid} 2>/dev/null",
        parent = std::process::id()
    );
    Command::new("/bin/sh")
        .args(["-c", &script])
        .process_group(pgid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(error = %e, "no watcher for a supervised program"))
        .ok()
}

/// Stdout as lines of at most `cap` bytes (lossy UTF-8).
fn read_lines(stdout: impl Read, cap: usize, tx: Sender<Out>) {
    let mut r = BufReader::new(stdout);
    loop {
        let mut buf = Vec::new();
        match r.by_ref().take(cap as u64 + 1).read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) if buf.last() != Some(&b'\n') && buf.len() > cap => {
                let _ = tx.send(Out::TooLong(cap));
                return;
            }
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                if tx.send(Out::Line(line)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Out::Failed(e));
                return;
            }
        }
    }
}

/// Stderr's last lines, each cut to its cap; the rest of a long line is read and dropped.
fn keep_tail(stderr: impl Read, limits: Limits, tail: &Mutex<VecDeque<String>>) {
    let mut r = BufReader::new(stderr);
    loop {
        let mut buf = Vec::new();
        let n = match r.by_ref().take(limits.stderr_line_bytes as u64).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let complete = buf.last() == Some(&b'\n');
        let mut line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
        if !complete && n == limits.stderr_line_bytes {
            line.push_str(" …(cut)");
            // Skip the rest of the line without keeping it.
            loop {
                let mut rest = Vec::new();
                match r.by_ref().take(64 << 10).read_until(b'\n', &mut rest) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if rest.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
        }
        let Ok(mut t) = tail.lock() else { return };
        if t.len() == limits.stderr_lines {
            t.pop_front();
        }
        t.push_back(line);
    }
}

fn ended_in_words(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(0), _) => "it exited (status 0)".into(),
        (Some(c), _) => format!("it exited with status {c}"),
        (None, Some(sig)) => format!("it was killed by signal {sig}"),
        (None, None) => "it ended".into(),
    }
}

/// An I/O error without Rust's Debug noise: `Broken pipe (os error 32)` → `broken pipe`.
fn plain_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe => "it had closed its input: broken pipe".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Supervised {
        Supervised::spawn(&["/bin/sh".into(), "-c".into(), script.into()], Path::new("/"), Limits::default()).unwrap()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn a_line_out_for_a_line_in() {
        let mut p = sh("while read l; do echo \"got $l\"; done");
        assert_eq!(p.exchange("a", soon(), "").unwrap(), "got a");
        assert_eq!(p.exchange("b", soon(), "").unwrap(), "got b");
    }

    #[test]
    fn a_program_that_exits_is_its_failure_not_r1pipes() {
        let mut p = sh("read l; exit 3");
        let e = p.exchange("a", soon(), "").unwrap_err().to_string();
        assert!(e.contains("exited with status 3"), "{e}");
        // The next write meets a closed pipe: an error, not a SIGPIPE (ignored in the binary).
        assert!(p.exchange("b", soon(), "").is_err());
    }

    #[test]
    fn a_program_that_never_reads_cannot_block_past_the_deadline() {
        let mut p = sh("sleep 30");
        let big = "x".repeat(1 << 20); // far more than a pipe holds
        let t = Instant::now();
        let e = p.exchange(&big, Instant::now() + Duration::from_millis(500), "timeout_s").unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(e.to_string().contains("did not read its input"), "{e}");
    }

    #[test]
    fn an_endless_line_is_refused_and_stderr_lines_are_cut() {
        let limits = Limits { line_bytes: 1000, stderr_lines: 3, stderr_line_bytes: 50 };
        let mut p = Supervised::spawn(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "head -c 100000 /dev/zero | tr '\\\\0' e >&2; echo >&2; echo tail >&2; read l; head -c 5000 /dev/zero"
                    .into(),
            ],
            Path::new("/"),
            limits,
        )
        .unwrap();
        let e = p.exchange("go", soon(), "").unwrap_err().to_string();
        assert!(e.contains("longer than 1000 bytes"), "{e}");
        let tail = p.stop();
        assert!(tail.iter().all(|l| l.len() <= 60), "{tail:?}");
        assert_eq!(tail.last().map(String::as_str), Some("tail"), "{tail:?}");
    }

    #[test]
    fn stopping_kills_the_programs_children_too() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut p = sh(&format!("sleep 60 & echo $! > {}; read l; echo ok; wait", pidfile.display()));
        assert_eq!(p.exchange("x", soon(), "").unwrap(), "ok");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        p.stop();
        std::thread::sleep(Duration::from_millis(200));
        // Gone, or a zombie waiting for init to reap it (killed either way).
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z'));
        assert!(!running, "the program's child {pid} outlived it: {state}");
    }

    #[test]
    fn stderr_written_just_before_failing_is_kept() {
        let mut p = sh("read l; echo 'the reason' >&2; exit 1");
        assert!(p.exchange("x", soon(), "").is_err());
        assert_eq!(p.stop(), vec!["the reason".to_string()]);
    }
}
