//! Chat templates rendered in a process of their own, with a memory budget.
//! A template comes with a model's files (untrusted). Fuel bounds its
//! instructions and `template_limits` the filters that could ask for
//! gigabytes in one call, but the `~` and `+` operators cannot be hooked: a
//! loop that doubles a string 40 times needs a terabyte in a few dozen
//! instructions. So the rendering runs in a child forked from this process
//! (it shares the parent's pages until it writes), whose data segment may
//! grow by [`BUDGET`] (`RLIMIT_DATA`, which on Linux counts the heap and
//! every private writable mapping): a template past it makes the child's
//! allocation fail and the child die, and the parent reports it as this
//! template's error. The child serves one request at a time over two pipes;
//! it holds no descriptor of the parent's but its two pipes, so it keeps no
//! lock, socket or pipe of r1pipe's open, and it ends when the parent does
//! (its request pipe closes).
//!
//! One child serves the whole process, and `r1pipe` starts it first thing
//! ([`start_early`]), while the process is small: a child forked after a
//! model is loaded would keep the pages the parent then rewrites (weights,
//! optimizer state) alive in itself, doubling a training run's memory. It is
//! started on first use where nobody started it early (a library caller), and
//! again after a template killed it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// How much a rendering child's data may grow beyond what it started with.
pub const BUDGET: u64 = 1 << 30;

/// What the child needs to render one prompt.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub template: String,
    pub messages: serde_json::Value,
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
}

/// The rendering child, once started.
#[derive(Default)]
pub struct Sandbox {
    child: Mutex<Option<Child>>,
}

/// The process's one sandbox.
static SANDBOX: Sandbox = Sandbox { child: Mutex::new(None) };

/// Start the process's rendering child now, while this process is small.
pub fn start_early(render: fn(&Request) -> Result<String>) {
    let mut guard = SANDBOX.child.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        // A failure here is reported again, with its reason, at the first render.
        *guard = start(render).ok();
    }
}

/// Render with the process's sandbox.
pub fn render(request: &Request, render: fn(&Request) -> Result<String>) -> Result<String> {
    SANDBOX.render(request, render)
}

struct Child {
    pid: libc::pid_t,
    requests: File,
    replies: File,
}

impl Drop for Child {
    fn drop(&mut self) {
        // Closing the request pipe ends the child's loop; then it is reaped.
        let _ = self.requests.flush();
        if self.pid <= 0 {
            return; // already reaped
        }
        // SAFETY: pid is our own child; a closed pipe makes it exit, and kill ends it if not.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

impl Sandbox {
    /// Render in the child with `render` (the in-process renderer the child runs).
    pub fn render(&self, request: &Request, render: fn(&Request) -> Result<String>) -> Result<String> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(start(render)?);
        }
        let child = guard.as_mut().expect("started above");
        let bytes = serde_json::to_vec(request)?;
        let sent = child
            .requests
            .write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| child.requests.write_all(&bytes));
        let reply = sent.and_then(|()| read_reply(&mut child.replies));
        match reply {
            Ok((true, text)) => Ok(text),
            Ok((false, error)) => bail!("{error}"),
            Err(_) => {
                // The child died. An allocation past its budget aborts it (SIGABRT);
                // anything else killed it from outside. The next render starts a new one.
                let mut status = 0;
                // SAFETY: waiting for our own child, which has closed its end by dying.
                unsafe { libc::waitpid(child.pid, &mut status, 0) };
                child.pid = 0;
                *guard = None;
                if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGABRT {
                    bail!(
                        "the chat template used more than {} MiB of memory for one prompt and was stopped \
                         (a loop that grows a string or list without end?)",
                        BUDGET >> 20
                    )
                }
                bail!("the process rendering chat templates ended (status {status}) before it answered")
            }
        }
    }
}

fn read_reply(from: &mut File) -> std::io::Result<(bool, String)> {
    let mut head = [0u8; 9];
    from.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
    let mut text = vec![0u8; len];
    from.read_exact(&mut text)?;
    Ok((head[0] == 1, String::from_utf8_lossy(&text).into_owned()))
}

fn pipe() -> Result<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two descriptors for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("making a pipe for the chat template's process: {}", std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

fn start(render: fn(&Request) -> Result<String>) -> Result<Child> {
    let (req_read, req_write) = pipe()?;
    let (rep_read, rep_write) = pipe()?;
    // SAFETY: the child runs only `serve` (pipe I/O, JSON and minijinja, with glibc's
    // fork-safe malloc) and leaves with _exit, never returning into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("starting the chat template's process: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        close_all_but(&[req_read, rep_write]);
        quiet_stdio();
        // A Ctrl-C (the terminal's process group) or a cluster's stop (sent to every
        // process of a job) is r1pipe's to act on: it checkpoints and may still need
        // templates. This child ends when r1pipe does, by its pipe.
        // SAFETY: signal dispositions of this single-threaded child.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
        limit_data(BUDGET);
        // SAFETY: the descriptors are this process's own, each wrapped once.
        let (requests, replies) = unsafe { (File::from_raw_fd(req_read), File::from_raw_fd(rep_write)) };
        serve(requests, replies, render);
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the parent's ends, each wrapped once; the child's ends are closed here.
    unsafe {
        libc::close(req_read);
        libc::close(rep_write);
        Ok(Child { pid, requests: File::from_raw_fd(req_write), replies: File::from_raw_fd(rep_read) })
    }
}

/// The child's loop: a request in, a reply out, until the parent closes the pipe.
fn serve(mut requests: File, mut replies: File, render: fn(&Request) -> Result<String>) {
    loop {
        let mut len = [0u8; 8];
        if requests.read_exact(&mut len).is_err() {
            return;
        }
        let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
        if requests.read_exact(&mut bytes).is_err() {
            return;
        }
        let (ok, text) =
            match serde_json::from_slice::<Request>(&bytes).context("a render request").and_then(|r| render(&r)) {
                Ok(text) => (1u8, text),
                Err(e) => (0u8, format!("{e:#}")),
            };
        let mut head = vec![ok];
        head.extend_from_slice(&(text.len() as u64).to_le_bytes());
        if replies.write_all(&head).and_then(|()| replies.write_all(text.as_bytes())).is_err() {
            return;
        }
    }
}

/// Close every descriptor but `keep` (and stdin/stdout/stderr).
fn close_all_but(keep: &[i32]) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: closing a descriptor of this (child) process; the listing's own is gone by now.
        unsafe { libc::close(fd) };
    }
}

/// The child's standard streams go nowhere: what it has to say (a template's
/// error) goes back as a reply, an allocation past the budget would otherwise
/// print the allocator's message into r1pipe's output, and a pipe reading
/// r1pipe's output must not wait for this child to close it.
fn quiet_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..=2 {
            // SAFETY: dup2 onto this process's own standard streams; `null` is closed after.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
        }
    }
}

/// Let this process's data grow by `budget` bytes beyond what it holds now.
fn limit_data(budget: u64) {
    let now_kb: u64 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmData:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let limit = (now_kb << 10).saturating_add(budget);
    let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit with a valid struct, in the child only.
    unsafe { libc::setrlimit(libc::RLIMIT_DATA, &rl) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(template: &str) -> Request {
        Request {
            template: template.into(),
            messages: serde_json::json!([]),
            add_generation_prompt: true,
            bos_token: "<s>".into(),
            eos_token: String::new(),
        }
    }

    /// A renderer that echoes, fails, or asks for twice the budget.
    fn fake(r: &Request) -> Result<String> {
        match r.template.as_str() {
            "grow" => {
                let v = vec![1u8; (2 * BUDGET) as usize];
                Ok(v.iter().map(|b| u64::from(*b)).sum::<u64>().to_string())
            }
            "fail" => bail!("no such filter"),
            t => Ok(format!("{t}{}", r.bos_token)),
        }
    }

    #[test]
    fn a_render_past_the_budget_is_an_error_and_the_next_render_gets_a_new_process() {
        let sandbox = Sandbox::default();
        assert_eq!(sandbox.render(&request("a"), fake).unwrap(), "a<s>");
        let first = sandbox.child.lock().unwrap().as_ref().unwrap().pid;
        let e = sandbox.render(&request("fail"), fake).unwrap_err();
        assert_eq!(e.to_string(), "no such filter");
        assert_eq!(sandbox.child.lock().unwrap().as_ref().unwrap().pid, first, "an error is not a crash");
        let e = sandbox.render(&request("grow"), fake).unwrap_err();
        assert!(e.to_string().contains("used more than 1024 MiB of memory"), "{e}");
        assert!(sandbox.child.lock().unwrap().is_none());
        assert_eq!(sandbox.render(&request("b"), fake).unwrap(), "b<s>");
        let second = sandbox.child.lock().unwrap().as_ref().unwrap().pid;
        assert_ne!(second, first);
        // A Ctrl-C or a stop reaches it and it renders on; a kill is said as such.
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(second, sig) };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(sandbox.render(&request("c"), fake).unwrap(), "c<s>");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(second, libc::SIGKILL) };
        let e = sandbox.render(&request("d"), fake).unwrap_err();
        assert!(e.to_string().contains("ended (status 9) before it answered"), "{e}");
        assert_eq!(sandbox.render(&request("e"), fake).unwrap(), "e<s>");
    }
}
