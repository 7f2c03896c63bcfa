//! A remote cache shared by two caches on this machine: the second trains
//! nothing (every stage pulled, bytes identical); a flipped byte in a remote
//! file is caught on pull and nothing of it enters the cache; a push killed
//! mid-way is completed by the next; an S3-compatible server
//! (`scripts/remote-local.sh up`, moto's) serves the same as a folder does.
//! The folder remote (`file://`) needs nothing; the S3 tests skip, saying
//! why, without their server.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::Project;

/// The tiny GRPO pipeline (download → format → grpo) with `remote:` set.
fn project(remote: &str) -> Project {
    let p = common::cluster_grpo_project("{ kind: local }");
    let text = fs::read_to_string(p.root().join("pipe.yaml")).unwrap();
    p.write(
        "pipe.yaml",
        &text
            .replace("max_steps: 24", "max_steps: 2")
            .replace("executor: { kind: local }", &format!("remote: {remote}")),
    );
    p
}

/// Every stage's output in the pipeline, as bytes (files of a folder in walk order).
fn outputs(p: &Project) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for target in ["gsm8k.dataset", "prompts.train", "grpo.model"] {
        let path = PathBuf::from(p.run(&["show", target, "-p", "pipe.yaml"]).ok().stdout.trim());
        let mut files = vec![path.clone()];
        if path.is_dir() {
            files = walk(&path);
        }
        for f in files {
            out.push((f.strip_prefix(&path).unwrap_or(&f).display().to_string(), fs::read(&f).unwrap()));
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            out.extend(walk(&e));
        } else {
            out.push(e);
        }
    }
    out
}

/// The remote's files (`files/…`), each a file's bytes.
fn remote_files(root: &Path) -> Vec<PathBuf> {
    walk(&root.join("files"))
}

#[test]
fn a_second_cache_pulls_everything_the_first_pushed_and_trains_nothing() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let a = project(&url);
    let r = a.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pushed to ").count(), 3, "{}", r.stdout);

    let b = project(&url);
    let status = b.run(&["status", "pipe.yaml"]).ok().stdout;
    assert_eq!(status.matches("in the remote").count(), 3, "{status}");
    let r = b.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from ").count(), 3, "{}", r.stdout);
    assert!(!r.stdout.contains(": run ") && !r.stdout.contains("done in"), "something ran: {}", r.stdout);
    assert!(outputs(&a) == outputs(&b), "the pulled artifacts are not the pushed ones");
    // A second push sends nothing: every file is already there.
    let r = a.run(&["push", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches("(0 B in 0 files").count(), 3, "{}", r.stdout);
}

#[test]
fn a_flipped_byte_in_the_remote_is_caught_on_pull_and_nothing_of_it_is_kept() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let a = project(&url);
    a.run(&["run", "pipe.yaml", "-q", "--until", "gsm8k"]).ok();
    let file = remote_files(shared.path()).into_iter().next().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes[0] ^= 1;
    fs::write(&file, &bytes).unwrap();

    let b = project(&url);
    let r = b.run(&["pull", "pipe.yaml", "gsm8k"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let key = file.strip_prefix(shared.path()).unwrap().display().to_string();
    assert!(
        r.stderr.contains(&format!("remote {url}: {key} does not hold the bytes its name promises")),
        "{}",
        r.stderr
    );
    assert!(!b.run(&["status", "pipe.yaml"]).ok().stdout.contains("cached"), "the damaged artifact was recorded");
    // What stays in pulls/ are whole, verified files the next pull uses; nothing half-written.
    let leftovers: Vec<String> = fs::read_dir(b.cache().join("pulls"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() != 64 || !n.bytes().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert!(leftovers.is_empty(), "half-pulled files or folders left: {leftovers:?}");
    // Mended at the source (the damaged file removed, pushed again), the pull goes through.
    fs::remove_file(&file).unwrap();
    a.run(&["push", "pipe.yaml", "gsm8k", "-q"]).ok();
    b.run(&["pull", "pipe.yaml", "gsm8k", "-q"]).ok();
    assert!(b.run(&["status", "pipe.yaml"]).ok().stdout.contains("cached"));
}

#[test]
fn verify_remote_finds_a_flipped_byte_drops_it_with_its_record_and_the_next_run_pushes_it_whole() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let a = project(&url);
    a.run(&["run", "pipe.yaml", "-q", "--until", "prompts"]).ok();
    let r = a.run(&["verify", "pipe.yaml", "--remote"]).ok();
    assert!(
        r.stdout.contains("ok       grpo-cluster/gsm8k.dataset") && r.stdout.contains(": 0 damaged"),
        "{}",
        r.stdout
    );

    let file = remote_files(shared.path()).into_iter().next().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes[0] ^= 1;
    fs::write(&file, &bytes).unwrap();
    let key = file.strip_prefix(shared.path()).unwrap().display().to_string();
    let r = a.run(&["verify", "pipe.yaml", "--remote"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(&format!("{key} does not hold the bytes its name promises")), "{}", r.stdout);
    assert!(r.stdout.contains("records dropped (these stages rerun)"), "{}", r.stdout);
    assert!(!file.exists(), "the damaged file stays in the remote, where no push would mend it");
    // The local cache was not touched; its next run pushes what the remote lost, whole.
    let r = a.run(&["verify", "pipe.yaml"]).ok();
    assert!(r.stdout.contains("5 artifact(s) re-hashed") && r.stdout.contains(": 0 damaged"), "{}", r.stdout);
    a.run(&["push", "pipe.yaml", "-q"]).ok();
    let r = a.run(&["verify", "pipe.yaml", "--remote"]).ok();
    assert!(r.stdout.contains(": 0 damaged"), "{}", r.stdout);
    let b = project(&url);
    b.run(&["pull", "pipe.yaml", "gsm8k", "prompts", "-q"]).ok();
}

#[test]
fn a_push_killed_mid_way_shows_nothing_and_the_next_push_completes_it() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let a = project(&url);
    a.run(&["run", "pipe.yaml", "-q", "--no-push"]).ok();
    assert!(!shared.path().join("records").exists(), "--no-push pushed");
    // Killed (as kill -9 would) right after the first file of the grpo model went up.
    let r = a.cmd(&["push", "pipe.yaml", "grpo", "-q"]).env("R1PIPE_FAULT", "push-after-file").output().unwrap();
    assert!(!r.status.success());
    assert_eq!(remote_files(shared.path()).len(), 1);
    let b = project(&url);
    assert!(!b.run(&["status", "pipe.yaml"]).ok().stdout.contains("in the remote"), "a record before its artifacts");
    let r = a.run(&["push", "pipe.yaml", "-q"]).ok();
    assert!(r.stdout.contains("grpo: pushed to") && r.stdout.contains("1 already there"), "{}", r.stdout);
    let r = b.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from ").count(), 3, "{}", r.stdout);
    assert!(outputs(&a) == outputs(&b));
}

#[test]
fn a_remote_that_cannot_be_used_is_named_with_what_to_do() {
    let p = project("\"s3://\"");
    let r = p.run(&["run", "pipe.yaml", "-q"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("remote s3://: no bucket (write `s3://BUCKET/PREFIX`)"), "{}", r.stderr);
    let r = p.run(&["push", "pipe.yaml", "--remote", "ftp://host/x"]);
    assert!(r.stderr.contains("r1pipe knows s3://, http(s):// (WebDAV) and file:// remotes"), "{}", r.stderr);
    let q = common::cluster_grpo_project("{ kind: local }");
    let r = q.run(&["pull", "pipe.yaml"]);
    assert!(r.stderr.contains("no remote: give `--remote URL`"), "{}", r.stderr);
    // Credentials in a URL never reach a message.
    p.write("pipe.yaml", &fs::read_to_string(p.root().join("pipe.yaml")).unwrap().replace("remote: \"s3://\"\n", ""));
    p.run(&["run", "pipe.yaml", "-q", "--until", "gsm8k"]).ok();
    let r = p.run(&["push", "pipe.yaml", "gsm8k", "--remote", "https://alice:s3cret@127.0.0.1:1/cache"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("s3cret") && r.stderr.contains("https://***@127.0.0.1:1/cache"), "{}", r.stderr);
}

fn s3_endpoint() -> String {
    std::env::var("R1PIPE_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5555".into())
}

/// Whether the S3-compatible server answers; if not, why.
fn s3_server() -> Result<(), String> {
    match ureq::get(&format!("{}/", s3_endpoint())).timeout(std::time::Duration::from_secs(5)).call() {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(..)) => Ok(()),
        Err(e) => Err(format!("{} does not answer ({e}); scripts/remote-local.sh up starts one", s3_endpoint())),
    }
}

/// `r1pipe ARGS` in `p` with S3 credentials from a shared credentials file (as
/// `aws configure` writes it), not from the environment.
fn with_s3(p: &Project, args: &[&str]) -> common::Run {
    let creds =
        p.write(".aws/credentials", "[default]\naws_access_key_id = test\naws_secret_access_key = sup3r-s3cret\n");
    let out = p
        .cmd(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_SHARED_CREDENTIALS_FILE", creds)
        .output()
        .unwrap();
    common::Run::from(out)
}

#[test]
fn an_s3_remote_serves_a_second_cache_and_a_missing_bucket_is_named() {
    if let Err(why) = s3_server() {
        common::skip(&format!("no S3-compatible server: {why}"));
        return;
    }
    let bucket = format!("r1pipe-test-{}", std::process::id());
    ureq::put(&format!("{}/{bucket}", s3_endpoint())).call().expect("creating the bucket");
    let remote = format!("{{ url: \"s3://{bucket}/team/cache\", endpoint: \"{}\" }}", s3_endpoint());
    let a = project(&remote);
    let r = with_s3(&a, &["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pushed to s3://").count(), 3, "{}", r.stdout);
    let b = project(&remote);
    let r = with_s3(&b, &["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from s3://").count(), 3, "{}", r.stdout);
    assert!(outputs(&a) == outputs(&b));
    // The objects are where the layout says, under the prefix.
    let listing = ureq::get(&format!("{}/{bucket}?prefix=team/cache/records/", s3_endpoint()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(listing.matches("<Key>team/cache/records/").count(), 3, "{listing}");

    let c =
        project(&format!("{{ url: \"s3://no-such-bucket-{}\", endpoint: \"{}\" }}", std::process::id(), s3_endpoint()));
    let r = with_s3(&c, &["run", "pipe.yaml", "-q"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(&format!("remote s3://no-such-bucket-{}", std::process::id())), "{}", r.stderr);
    assert!(!r.stderr.contains("sup3r-s3cret"), "{}", r.stderr);
}

/// The S3 server of `scripts/remote-local.sh` that checks credentials (moto's IAM
/// mode), and the one key it takes (with the bucket `r1pipe-auth`); if none, why.
fn s3_server_checking_credentials() -> Result<(String, String, String), String> {
    let endpoint = std::env::var("R1PIPE_S3_AUTH_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5556".into());
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-remote/s3-auth.env");
    let text = fs::read_to_string(&file)
        .map_err(|e| format!("no key in {} ({e}); scripts/remote-local.sh up starts the server", file.display()))?;
    let var = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).map(str::to_string).ok_or(format!("no {name}"))
    };
    match ureq::get(&format!("{endpoint}/moto-api/")).timeout(std::time::Duration::from_secs(5)).call() {
        Ok(_) | Err(ureq::Error::Status(..)) => {
            Ok((endpoint, var("AWS_ACCESS_KEY_ID")?, var("AWS_SECRET_ACCESS_KEY")?))
        }
        Err(e) => Err(format!("{endpoint} does not answer ({e})")),
    }
}

#[test]
fn an_s3_server_that_checks_credentials_takes_the_right_key_and_names_a_wrong_one_without_showing_it() {
    let (endpoint, key, secret) = match s3_server_checking_credentials() {
        Ok(found) => found,
        Err(why) => {
            common::skip(&format!("no credential-checking S3 server: {why}"));
            return;
        }
    };
    let remote = format!("{{ url: \"s3://r1pipe-auth/run-{}\", endpoint: \"{endpoint}\" }}", std::process::id());
    let run = |p: &Project, key: &str, secret: &str| -> common::Run {
        let mut cmd = p.cmd(&["run", "pipe.yaml", "-q"]);
        cmd.env("AWS_ACCESS_KEY_ID", key).env("AWS_SECRET_ACCESS_KEY", secret).env_remove("AWS_PROFILE");
        cmd.env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent").output().unwrap().into()
    };
    for (id, wrong_secret, code) in [
        (key.as_str(), "not-the-secret-key-0123456789", "SignatureDoesNotMatch"),
        ("AKIANOSUCHKEY0000000", "any-secret-key-0123456789", "InvalidAccessKeyId"),
    ] {
        let p = project(&remote);
        let r = run(&p, id, wrong_secret);
        assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("remote s3://r1pipe-auth/run-") && r.stderr.contains(code), "{}", r.stderr);
        assert!(r.stderr.contains("the server refused the credentials"), "{}", r.stderr);
        assert!(!r.stderr.contains(wrong_secret) && !r.stdout.contains(wrong_secret), "{}", r.stderr);
        assert!(!r.stdout.contains(": run "), "nothing runs before the remote is readable: {}", r.stdout);
    }
    let a = project(&remote);
    let r = run(&a, &key, &secret).ok();
    assert_eq!(r.stdout.matches(": pushed to s3://").count(), 3, "{}", r.stdout);
    let b = project(&remote);
    let r = run(&b, &key, &secret).ok();
    assert_eq!(r.stdout.matches(": pulled from s3://").count(), 3, "{}", r.stdout);
    assert!(outputs(&a) == outputs(&b));
}

fn dav_url() -> String {
    std::env::var("R1PIPE_DAV_URL").unwrap_or_else(|_| "http://127.0.0.1:8089/cache".into())
}

#[test]
fn a_webdav_remote_serves_a_second_cache() {
    let base = dav_url();
    let answer = ureq::request("OPTIONS", &format!("{base}/")).timeout(std::time::Duration::from_secs(5)).call();
    if !answer.as_ref().is_ok_and(|r| r.header("Allow").is_some_and(|a| a.contains("PROPFIND"))) {
        common::skip(&format!("no WebDAV server at {base} (scripts/remote-local.sh up starts Apache's)"));
        return;
    }
    // A folder of its own on the server, made by r1pipe (the remote's path need not exist).
    let url = format!("{base}/run-{}/team", std::process::id());
    let a = project(&url);
    let r = a.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pushed to http://").count(), 3, "{}", r.stdout);
    let b = project(&url);
    let status = b.run(&["status", "pipe.yaml"]).ok().stdout;
    assert_eq!(status.matches("in the remote").count(), 3, "{status}");
    let r = b.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from http://").count(), 3, "{}", r.stdout);
    assert!(outputs(&a) == outputs(&b));
}

#[test]
fn a_webdav_remote_behind_a_password_works_with_it_and_names_a_wrong_one_without_showing_it() {
    // scripts/remote-local.sh serves /private/ beside /cache/, behind HTTP Basic auth.
    let base = dav_url().replace("/cache", "/private");
    let answer = ureq::request("OPTIONS", &format!("{base}/")).timeout(std::time::Duration::from_secs(5)).call();
    if !matches!(answer, Err(ureq::Error::Status(401, _))) {
        common::skip(&format!("no password-protected WebDAV folder at {base} (scripts/remote-local.sh up serves one)"));
        return;
    }
    let with = |password: &str| base.replacen("://", &format!("://r1pipe:{password}@"), 1);
    let folder = format!("run-{}", std::process::id());
    let wrong = project(&format!("{}/{folder}", with("not-the-password")));
    let r = wrong.run(&["run", "pipe.yaml", "-q"]);
    assert_ne!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(said.contains("HTTP 401") && said.contains("refused the credentials"), "{said}");
    assert!(said.contains("remote http://") && said.contains("127.0.0.1:"), "the remote is named: {said}");
    assert!(!said.contains("not-the-password"), "the password must not be shown: {said}");

    let url = format!("{}/{folder}", with("r1pipe-dav"));
    let a = project(&url);
    let r = a.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pushed to http://").count(), 3, "{}", r.stdout);
    assert!(!r.stdout.contains("r1pipe-dav@") && !r.stderr.contains("r1pipe-dav@"), "{}{}", r.stdout, r.stderr);
    let b = project(&url);
    let r = b.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from http://").count(), 3, "{}", r.stdout);
    assert!(outputs(&a) == outputs(&b));
}

#[test]
fn gc_remote_drops_only_what_no_current_result_needs_and_only_when_asked() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let pipe = |text: &str| {
        format!(
            "name: sweep\nremote: {url}\nstages:\n  a: {{ kind: test.counter, with: {{ steps: 2, text: {text} }} }}\n  \
             b: {{ kind: test.counter, with: {{ steps: 1, text: b }} }}\n"
        )
    };
    let p = Project::new();
    p.write("pipe.yaml", &pipe("old"));
    p.run(&["run", "pipe.yaml", "-q"]).ok();
    p.write("pipe.yaml", &pipe("new"));
    p.run(&["run", "pipe.yaml", "-q"]).ok();
    let count = |dir: &str| walk(&shared.path().join(dir)).len();
    assert_eq!((count("records"), count("objects"), count("files")), (3, 3, 3));

    // A local gc never touches the remote.
    p.run(&["gc", "pipe.yaml"]).ok();
    assert_eq!(count("records"), 3);
    // Within the grace period nothing unreferenced goes (a push may be under way) …
    let r = p.run(&["gc", "pipe.yaml", "--remote"]).ok();
    assert!(
        r.stdout.contains("removed 1 item(s)") && r.stdout.contains("the record of sweep/a.result"),
        "{}",
        r.stdout
    );
    assert_eq!((count("records"), count("files")), (2, 3));
    // … after it, the old run's artifact; a dry run first says so and removes nothing.
    let r = p.run(&["gc", "pipe.yaml", "--remote", "--grace-minutes", "0", "--dry-run"]).ok();
    assert!(r.stdout.contains("would remove 2 item(s)"), "{}", r.stdout);
    assert!(
        r.stdout.contains("the manifest of an artifact no record refers to")
            && r.stdout.contains("a file no kept artifact holds"),
        "{}",
        r.stdout
    );
    assert_eq!(count("files"), 3);
    p.run(&["gc", "pipe.yaml", "--remote", "--grace-minutes", "0"]).ok();
    assert_eq!((count("records"), count("objects"), count("files")), (2, 2, 2));
    // What is current is whole: a fresh cache pulls it.
    let q = Project::new();
    q.write("pipe.yaml", &pipe("new"));
    let r = q.run(&["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from ").count(), 2, "{}", r.stdout);
}

/// A pipeline whose one artifact holds a file of about 45 MB: larger than a
/// part, so S3 and folder remotes get it in parts.
fn large_project(remote: &str) -> Project {
    let p = Project::new();
    p.write("data/big/train.jsonl", &common::gsm8k_rows(330_000));
    p.write("data/big/test.jsonl", &common::gsm8k_rows(2));
    p.write(
        "pipe.yaml",
        &format!("name: big\nremote: {remote}\nstages:\n  data: {{ kind: download, with: {{ path: data/big }} }}\n"),
    );
    p
}

#[test]
fn a_file_larger_than_a_part_goes_up_in_parts_and_comes_back_whole() {
    let mut remotes = vec![];
    let shared = tempfile::tempdir().unwrap();
    remotes.push((format!("file://{}", shared.path().display()), false));
    match s3_server() {
        Ok(()) => {
            let bucket = format!("r1pipe-parts-{}", std::process::id());
            ureq::put(&format!("{}/{bucket}", s3_endpoint())).call().expect("creating the bucket");
            remotes.push((format!("{{ url: \"s3://{bucket}/p\", endpoint: \"{}\" }}", s3_endpoint()), true));
        }
        Err(why) => common::skip(&format!("the S3 half of this test: no S3-compatible server: {why}")),
    }
    for (remote, s3) in remotes {
        let run = |p: &Project, args: &[&str]| if s3 { with_s3(p, args) } else { p.run(args) };
        let a = large_project(&remote);
        let r = run(&a, &["run", "pipe.yaml", "-q"]).ok();
        assert!(r.stdout.contains("data: pushed to"), "{}", r.stdout);
        let b = large_project(&remote);
        let r = run(&b, &["run", "pipe.yaml", "-q"]).ok();
        assert!(r.stdout.contains("data: pulled from"), "{}", r.stdout);
        let show = |p: &Project| PathBuf::from(p.run(&["show", "data.dataset", "-p", "pipe.yaml"]).ok().stdout.trim());
        let (fa, fb) = (show(&a).join("train.jsonl"), show(&b).join("train.jsonl"));
        assert!(fs::metadata(&fa).unwrap().len() > 40 << 20);
        assert!(fs::read(&fa).unwrap() == fs::read(&fb).unwrap(), "{remote}: the large file came back different");
    }
}

/// Unmounts its folder when dropped (a test that fails leaves no mount behind).
struct Mounted(std::path::PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_during_a_pull_is_named_leaves_nothing_half_written_and_the_next_pull_completes() {
    // A pipeline whose one artifact (a data set of about 8 MiB) is larger than the pulling cache's disk.
    let shared = tempfile::tempdir().unwrap();
    let pipe = format!(
        "name: big\nremote: file://{}\nstages:\n  data: {{ kind: download, with: {{ path: data/big }} }}\n",
        shared.path().display()
    );
    let with_data = || {
        let p = Project::new();
        p.write("pipe.yaml", &pipe);
        p.write("data/big/train.jsonl", &common::gsm8k_rows(60_000));
        p.write("data/big/test.jsonl", &common::gsm8k_rows(2));
        p
    };
    let a = with_data();
    a.run(&["run", "pipe.yaml", "-q"]).ok();

    // The second cache on a 4 MiB disk of its own: a tmpfs (mounting needs root).
    let disk = tempfile::tempdir().unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(disk.path())
        .output()
        .unwrap();
    if !mount.status.success() {
        common::skip(&format!(
            "cannot mount a small tmpfs to fill (needs root): {}",
            String::from_utf8_lossy(&mount.stderr).trim()
        ));
        return;
    }
    let _mounted = Mounted(disk.path().to_path_buf());
    let cache = disk.path().join("cache");
    let cache_arg = cache.display().to_string();
    let b = with_data();
    let r = b.run(&["pull", "pipe.yaml", "--cache", &cache_arg]);
    assert_ne!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(said.contains("remote file://") && said.contains("pulling files/"), "the remote and object named: {said}");
    assert!(said.contains("No space left on device") && said.contains("disk is full"), "{said}");
    // Nothing half-written: no partial file, no artifact, no record.
    let parts: Vec<_> = fs::read_dir(cache.join("pulls"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), "{parts:?}");
    let objects: Vec<_> = fs::read_dir(cache.join("objects")).into_iter().flatten().flatten().collect();
    assert!(objects.is_empty(), "{objects:?}");
    let status = b.run(&["status", "pipe.yaml", "--cache", &cache_arg]).ok().stdout;
    assert!(status.contains("in the remote") && !status.contains("cached"), "{status}");

    // Room made: the next pull completes, the bytes the first cache has.
    let grown = std::process::Command::new("mount").args(["-o", "remount,size=64m"]).arg(disk.path()).status();
    assert!(grown.unwrap().success());
    let r = b.run(&["pull", "pipe.yaml", "--cache", &cache_arg]).ok();
    assert!(r.stdout.contains("data: pulled from file://"), "{}", r.stdout);
    let dataset = |p: &Project, extra: &[&str]| {
        let mut args = vec!["show", "data.dataset", "-p", "pipe.yaml"];
        args.extend(extra);
        let dir = p.run(&args).ok().stdout.trim().to_string();
        fs::read(format!("{dir}/train.jsonl")).unwrap()
    };
    assert!(dataset(&a, &[]) == dataset(&b, &["--cache", &cache_arg]));
}

/// A TCP proxy in front of `upstream` that drops each connection once the client
/// has sent `limit` bytes through it: a server that goes away mid-upload.
fn cutting_proxy(upstream: &str, limit: usize) -> String {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else { continue };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                let mut sent = 0;
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 || sent + n > limit || s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = s_out.shutdown(Shutdown::Both);
                let _ = c_in.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(Shutdown::Both);
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_server_that_drops_the_connection_mid_upload_is_named_leaves_no_record_and_the_next_push_completes() {
    if let Err(why) = s3_server() {
        common::skip(&format!("no S3-compatible server: {why}"));
        return;
    }
    let bucket = format!("r1pipe-drop-{}", std::process::id());
    ureq::put(&format!("{}/{bucket}", s3_endpoint())).call().expect("creating the bucket");
    let upstream = s3_endpoint().trim_start_matches("http://").to_string();
    // Small requests pass; a model's file (megabytes) is cut off on every try.
    let proxy = cutting_proxy(&upstream, 1 << 20);
    let through_proxy = format!("{{ url: \"s3://{bucket}/c\", endpoint: \"{proxy}\" }}");
    let a = project(&through_proxy);
    let r = with_s3(&a, &["run", "pipe.yaml", "-q"]).ok();
    // The run's results are safe locally; the failed push is named, and says what to do.
    assert!(r.stderr.contains("grpo: not pushed: remote s3://") && r.stderr.contains("writing files/"), "{}", r.stderr);
    assert!(r.stderr.contains("`r1pipe push` sends it later"), "{}", r.stderr);
    let records = ureq::get(&format!("{}/{bucket}?prefix=c/records/", s3_endpoint())).call().unwrap();
    let listing = records.into_string().unwrap();
    assert_eq!(listing.matches("<Key>c/records/").count(), 2, "only the stages pushed whole are recorded: {listing}");

    // The server reachable again (no proxy): the next push sends the rest.
    let direct = format!("{{ url: \"s3://{bucket}/c\", endpoint: \"{}\" }}", s3_endpoint());
    a.write("pipe.yaml", &fs::read_to_string(a.root().join("pipe.yaml")).unwrap().replace(&through_proxy, &direct));
    let r = with_s3(&a, &["push", "pipe.yaml", "-q"]).ok();
    assert!(r.stdout.contains("grpo: pushed to s3://"), "{}", r.stdout);
    let b = project(&direct);
    let r = with_s3(&b, &["run", "pipe.yaml", "-q"]).ok();
    assert_eq!(r.stdout.matches(": pulled from s3://").count(), 3, "{}", r.stdout);
    assert!(outputs(&a) == outputs(&b));
}
