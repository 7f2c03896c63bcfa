//! Hostile inputs: names and records that would lead paths out of their
//! folders, files that are not what a field expects, and markup where text
//! belongs. Each is refused with the file, field or name, before any work, and
//! never by echoing a file's content.

mod common;

use std::fs;

use common::Project;

const CHAIN: &str = r#"
name: chain
stages:
  a:
    kind: test.counter
    with: { steps: 1, text: "alpha" }
"#;

#[test]
fn stage_and_pipeline_names_that_could_leave_a_folder_are_refused() {
    let p = Project::new();
    for (name, field) in [
        ("\"../../../../tmp/x\"", "stage name"),
        ("/abs", "stage name"),
        ("\"<img src=x onerror=alert(1)>\"", "stage name"),
        ("vars", "`vars` cannot name a stage"),
    ] {
        p.write("pipe.yaml", &CHAIN.replace("  a:\n", &format!("  {name}:\n")));
        let r = p.run(&["run", "pipe.yaml"]);
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        assert!(r.stderr.contains("pipe.yaml:") && r.stderr.contains(field), "{name}: {}", r.stderr);
    }
    p.write("pipe.yaml", &CHAIN.replace("name: chain", "name: ../../escape"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert!(
        r.code == 2 && r.stderr.contains("pipe.yaml:2:") && r.stderr.contains("the pipeline's name"),
        "{}",
        r.stderr
    );
    assert!(!p.root().join("../../escape").exists() && !p.cache().exists(), "nothing was written");
}

#[test]
fn a_preset_that_is_not_yaml_is_refused_without_echoing_it() {
    let p = Project::new();
    p.write("secret.txt", "root:$6$hash-of-a-password:19000:0:99999:7:::\n");
    for target in ["secret.txt", "/dev/zero"] {
        p.write(
            "pipe.yaml",
            &CHAIN.replace("    kind: test.counter\n", &format!("    kind: test.counter\n    use: {target}\n")),
        );
        let r = p.run(&["run", "pipe.yaml"]);
        assert_eq!(r.code, 2, "{target}: {}", r.stderr);
        assert!(r.stderr.contains("a preset is a built-in name or a YAML file"), "{target}: {}", r.stderr);
        assert!(!r.stderr.contains("hash-of-a-password"), "the content is not echoed: {}", r.stderr);
    }
    // A file with the right name but the wrong size is refused after a bounded read.
    fs::write(p.root().join("big.yaml"), vec![b'#'; 2 << 20]).unwrap();
    p.write("pipe.yaml", &CHAIN.replace("    kind: test.counter\n", "    kind: test.counter\n    use: big.yaml\n"));
    let r = p.run(&["run", "pipe.yaml"]);
    assert!(r.code == 2 && r.stderr.contains("larger than 1024 KiB"), "{}", r.stderr);
}

#[test]
fn a_pipeline_saved_with_a_byte_order_mark_loads() {
    let p = Project::new();
    p.write("pipe.yaml", &format!("\u{feff}{CHAIN}"));
    p.run(&["run", "pipe.yaml"]).ok();
}

#[test]
fn a_record_edited_to_point_outside_the_cache_is_never_followed() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    let records = p.cache().join("records");
    let copy = fs::read_dir(&records).unwrap().flatten().next().unwrap().path();
    let text = fs::read_to_string(&copy).unwrap();
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    let hash = record["outputs"]["result"]["hash"].as_str().unwrap().to_string();
    fs::write(&copy, text.replace(&hash, "../../../../tmp/outside")).unwrap();
    let r = p.run(&["gc", "--repair"]).ok();
    assert!(r.stdout.contains("0 record(s) restored"), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("not a content hash"), "the bad record is named: {}", r.stderr);
    let shown = p.run(&["show", "a.result", "-p", "pipe.yaml"]);
    assert!(!shown.stdout.contains("outside"), "{}", shown.stdout);
}

/// A sharded model's index names its shards: only plain .safetensors files beside it.
#[test]
fn a_shard_index_that_points_outside_the_model_folder_is_refused() {
    let p = Project::new();
    let dir = p.root().join("models/tiny");
    common::tiny_model(&dir, 1);
    fs::rename(dir.join("model.safetensors"), dir.join("model-00001-of-00001.safetensors")).unwrap();
    for target in ["../../secret.safetensors", "/etc/passwd", "model-00001-of-00001.safetensors/../x.safetensors"] {
        let index = serde_json::json!({"weight_map": {"model.norm.weight": target}});
        fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let r = p.run(&["infer", "--model", "models/tiny", "--max-new-tokens", "1", "hi"]);
        assert_eq!(r.code, 1, "{target}: {}", r.stderr);
        assert!(
            r.stderr.contains("weight_map.model.norm.weight")
                && r.stderr.contains("not a .safetensors file beside the index"),
            "{target}: {}",
            r.stderr
        );
    }
}

/// A prompt that encodes to nothing, or a token budget beyond the model's context,
/// is a clear error before generation (it was a panic and an allocation abort).
#[test]
fn generation_refuses_empty_prompts_and_budgets_beyond_the_context() {
    let p = Project::new();
    let dir = p.root().join("models/tiny");
    common::tiny_model(&dir, 1);
    let r = p.run(&["infer", "--model", "models/tiny", "--max-new-tokens", "10000000000000", "hi"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("more than the model's context of 2048 tokens"), "{}", r.stderr);
    let config = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(&config).unwrap()).unwrap();
    cfg["chat_template"] = serde_json::json!("");
    fs::write(&config, cfg.to_string()).unwrap();
    let r = p.run(&["infer", "--model", "models/tiny", "--max-new-tokens", "2", "hi"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("encodes to no tokens") && !r.stderr.contains("panicked"), "{}", r.stderr);
}

/// A deleted index with the record copies still there points at the repair, which
/// keeps every finished stage, instead of silently rerunning everything.
#[test]
fn a_deleted_index_points_at_the_repair_instead_of_rerunning_everything() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    fs::remove_dir_all(p.cache().join("index")).unwrap();
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("is missing") && r.stderr.contains("r1pipe gc --repair"), "{}", r.stderr);
    p.run(&["gc", "--repair"]).ok();
    assert!(p.run(&["run", "pipe.yaml"]).ok().skipped("a"));
}

const TWO: &str = r#"
name: two
stages:
  a: { kind: test.counter, with: { steps: 1, text: "alpha" } }
  b: { kind: test.counter, with: { steps: 1, text: "beta", input: "${a.result}" } }
"#;

/// `a`'s stored result, opened for writing as a determined user would (folders
/// are read-only), changed by `change`, with its mtime kept when `same_mtime`.
fn tamper_with_a(p: &Project, same_mtime: bool, change: impl FnOnce(&std::path::Path)) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::path::PathBuf::from(p.run(&["show", "a.result", "-p", "pipe.yaml"]).ok().stdout.trim());
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    fs::set_permissions(path.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    change(&path);
    if same_mtime && path.exists() {
        fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    }
    path
}

fn same_size_other_bytes(path: &std::path::Path) {
    let mut bytes = fs::read(path).unwrap();
    bytes[0] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_changed_or_deleted_artifact_is_noticed_by_status_show_and_run_and_remade() {
    for (what, change) in [
        ("changed", Box::new(same_size_other_bytes) as Box<dyn Fn(&std::path::Path)>),
        ("deleted", Box::new(|f: &std::path::Path| fs::remove_file(f).unwrap())),
    ] {
        let p = Project::new();
        p.write("pipe.yaml", TWO);
        p.run(&["run", "pipe.yaml"]).ok();
        let original = fs::read(p.run(&["show", "a.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
        tamper_with_a(&p, false, |f| change(f));
        let status = p.run(&["status", "pipe.yaml"]);
        assert!(status.stdout.contains("its cached output `result` is damaged"), "{what}: {}", status.stdout);
        let show = p.run(&["show", "a.result", "-p", "pipe.yaml"]);
        assert!(show.code != 0, "{what}: show returned a damaged artifact: {}", show.stdout);
        let r = p.run(&["run", "pipe.yaml"]).ok();
        assert!(r.decision("a").contains("run") && r.stdout.contains("is damaged"), "{what}: {}", r.stdout);
        let remade = fs::read(p.run(&["show", "a.result", "-p", "pipe.yaml"]).ok().stdout.trim()).unwrap();
        assert_eq!(remade, original, "{what}");
        assert!(p.run(&["run", "pipe.yaml"]).ok().skipped("b"), "{what}: the downstream stage saw the same input");
    }
}

#[test]
fn damage_that_keeps_size_and_mtime_is_found_by_verify_and_by_the_stage_that_reads_it() {
    let p = Project::new();
    p.write("pipe.yaml", TWO);
    p.run(&["run", "pipe.yaml"]).ok();
    let clean = p.run(&["verify", "pipe.yaml"]);
    assert_eq!(clean.code, 0, "{}", clean.stdout);
    assert!(clean.stdout.contains("ok       two/a.result") && clean.stdout.contains("0 damaged"), "{}", clean.stdout);

    // verify re-reads every byte: it names the artifact, drops it, and the next run remakes it.
    tamper_with_a(&p, true, same_size_other_bytes);
    assert!(p.run(&["status", "pipe.yaml"]).stdout.contains("cached"), "a cheap check cannot see this damage");
    let v = p.run(&["verify", "pipe.yaml"]);
    assert_eq!(v.code, 1, "{}", v.stdout);
    assert!(
        v.stdout.contains("DAMAGED  two/a.result") && v.stdout.contains("has changed since it was stored"),
        "{}",
        v.stdout
    );
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(!r.skipped("a"), "{}", r.stdout);
    assert_eq!(p.run(&["verify", "pipe.yaml"]).code, 0);

    // A stage that reads it re-hashes it in full first: it fails naming the
    // damaged input, and the next run remakes `a` (`b`'s own result, made from
    // the same content, stays valid).
    tamper_with_a(&p, true, same_size_other_bytes);
    let r = p.run(&["run", "pipe.yaml", "--force", "b"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("`b` reads `a.result`, which is damaged"), "{}", r.stderr);
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(!r.skipped("a") && r.skipped("b"), "{}", r.stdout);
    assert_eq!(p.run(&["verify", "pipe.yaml"]).code, 0);
}

/// A model folder of the tiny test model whose chat template is `template`.
fn model_with_template(p: &Project, template: &str) -> std::path::PathBuf {
    let dir = p.root().join("models/tiny");
    common::tiny_model(&dir, 1);
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = template.into();
    let _ = fs::remove_file(&cfg_path); // copied read-only from the shared model
    fs::write(&cfg_path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn a_chat_template_that_loops_too_long_or_writes_too_much_is_stopped_with_a_reason() {
    let p = Project::new();
    for (template, said) in [
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "ran out of its budget"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "wrote more than 16 MiB",
        ),
        // Growth the fuel and the output cap never see: a string and a list doubled 40
        // times (a terabyte) and only their lengths written. The template's own process
        // runs out of its memory budget; r1pipe says so.
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "used more than 1024 MiB of memory for one prompt",
        ),
        (
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "used more than 1024 MiB of memory for one prompt",
        ),
    ] {
        let model = model_with_template(&p, template);
        let r = p.run(&["infer", "--model", model.to_str().unwrap(), "--max-new-tokens", "2", "hi"]);
        assert_eq!(r.code, 1, "{template}: {}", r.stderr);
        assert!(r.stderr.contains(said), "{template}: {}", r.stderr);
    }
}

#[test]
fn sizes_no_machine_can_hold_are_refused_before_any_allocation_with_the_field_named() {
    let p = Project::new();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(common::shared().join("models/smollm2-135m-instruct/config.json")).unwrap(),
    )
    .unwrap();
    cfg["num_hidden_layers"] = 1_000_000_000u64.into();
    p.write("big/config.json", &cfg.to_string());
    let tokenizer = common::shared().join("models/smollm2-135m-instruct");
    let r =
        p.run(&["convert", "--config", "big/config.json", "--tokenizer", tokenizer.to_str().unwrap(), "--out", "x"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("more than the") && r.stderr.contains("`num_hidden_layers` = 1000000000"),
        "{}",
        r.stderr
    );

    // A model that fits the machine but not the process's limit (ulimit -v, as a Slurm --mem):
    // refused naming the limit, not killed by the allocator.
    cfg["num_hidden_layers"] = 200.into(); // about 0.7 GiB of f32 weights
    p.write("big/config.json", &cfg.to_string());
    let mut cmd =
        p.cmd(&["convert", "--config", "big/config.json", "--tokenizer", tokenizer.to_str().unwrap(), "--out", "x"]);
    // SAFETY: setrlimit in the child before exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 512 << 20, rlim_max: 512 << 20 };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let r = common::Run::from(cmd.output().unwrap());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("address-space limit (ulimit -v)"), "{}", r.stderr);

    cfg["num_hidden_layers"] = 2.into();
    cfg["rms_norm_eps"] = (-1.0).into();
    p.write("big/config.json", &cfg.to_string());
    let r =
        p.run(&["convert", "--config", "big/config.json", "--tokenizer", tokenizer.to_str().unwrap(), "--out", "x"]);
    assert!(r.code == 1 && r.stderr.contains("`rms_norm_eps` = -1 must be a small positive number"), "{}", r.stderr);

    for (field, value) in [("per_device_train_batch_size", "1000000000000"), ("num_generations", "100000000")] {
        p.write(
            "pipe.yaml",
            &format!(
                "stages:\n  grpo:\n    kind: grpo\n    with:\n      model: {}\n      train: t.jsonl\n      \
                 rewards: [ {{ name: correctness }} ]\n      {field}: {value}\n",
                tokenizer.display()
            ),
        );
        p.write("t.jsonl", "");
        let r = p.run(&["run", "pipe.yaml"]);
        assert_eq!(r.code, 2, "{field}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("parameter `{field}`: {value} is more than 65536 rows")), "{}", r.stderr);
    }
}

#[test]
fn yaml_nested_beyond_reason_is_refused_at_once_naming_the_line() {
    let p = Project::new();
    p.write("pipe.yaml", &format!("name: deep\nstages:\n  a: {}\n", "[".repeat(200_000)));
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("pipe.yaml:3: `[` and `{` nest more than 64 deep here"), "{}", r.stderr);
    // Brackets inside quotes and comments are text, not nesting.
    let quoted = format!(
        "name: q\nstages:\n  a: {{ kind: test.counter, with: {{ steps: 1, text: \"{}\" }} }} # {}\n",
        "[".repeat(100),
        "{".repeat(100)
    );
    p.write("pipe.yaml", &quoted);
    p.run(&["run", "pipe.yaml"]).ok();
}

#[test]
fn a_device_named_as_an_input_file_is_refused_before_any_stage_runs() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        "name: dev\nstages:\n  a: { kind: test.counter, with: { steps: 1, text: x } }\n  \
         ask: { kind: infer, with: { model: models/none, questions: /dev/zero } }\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`questions` names /dev/zero, which is not a regular file or folder"), "{}", r.stderr);
    assert!(!p.cache().exists(), "a stage ran before the inputs were checked");
}

#[test]
fn errors_say_what_is_wrong_and_only_that() {
    let p = Project::new();
    // U2: a non-finite number is the one error, not also "`model` missing".
    p.write(
        "pipe.yaml",
        "stages:\n  sft:\n    kind: sft\n    with:\n      model: m\n      train: t.jsonl\n      learning_rate: .nan\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert!(r.code == 2 && r.stderr.contains("pipe.yaml:7: stage `sft`: number NaN is not finite"), "{}", r.stderr);
    assert!(!r.stderr.contains("required parameter is missing"), "{}", r.stderr);
    // U6: a reference inside vars is refused, not passed on as text.
    p.write(
        "pipe.yaml",
        "vars: { a: \"${b.c}\" }\nstages:\n  a: { kind: test.counter, with: { steps: 1, text: \"${vars.a}\" } }\n",
    );
    let r = p.run(&["run", "pipe.yaml"]);
    assert!(r.code == 2 && r.stderr.contains("`vars.a` holds a `${…}` reference"), "{}", r.stderr);
    // U7: a missing folder under an existing one is a missing path, not a hub id to download.
    fs::create_dir_all(p.root().join("models")).unwrap();
    p.write("pipe.yaml", "stages:\n  ask: { kind: infer, with: { model: models/missing, questions: [\"hi\"] } }\n");
    let r = p.run(&["run", "pipe.yaml"]);
    assert!(
        r.code == 2 && r.stderr.contains("`models/` is a folder here, so this is a path, not a hub id"),
        "{}",
        r.stderr
    );
    // U10: an OS error names its path.
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    fs::remove_file(p.cache().join("LOCK")).unwrap();
    fs::create_dir(p.cache().join("LOCK")).unwrap();
    let r = p.run(&["run", "pipe.yaml"]);
    assert!(
        r.code == 1 && r.stderr.contains("opening the cache's lock file") && r.stderr.contains("LOCK"),
        "{}",
        r.stderr
    );
}

/// A read-only view of `dir` at `at` (a read-only bind mount), unmounted when dropped.
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn new(dir: &std::path::Path, at: &std::path::Path) -> Result<ReadOnlyMount, String> {
        fs::create_dir_all(at).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("mount").args(args).output().map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
        };
        run(&["--bind", dir.to_str().unwrap(), at.to_str().unwrap()])?;
        let mounted = ReadOnlyMount(at.to_path_buf());
        run(&["-o", "remount,ro,bind", at.to_str().unwrap()])?;
        Ok(mounted)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_cache_serves_status_show_verify_and_a_run_with_nothing_to_do() {
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    p.run(&["run", "pipe.yaml"]).ok();
    let ro = p.root().join("ro");
    let _mount = match ReadOnlyMount::new(&p.cache(), &ro) {
        Ok(m) => m,
        Err(e) => {
            // Needs root (or CAP_SYS_ADMIN); as another user, chmod makes a read-only cache instead.
            common::skip(&format!("cannot make a read-only bind mount here ({e})"));
            return;
        }
    };
    assert!(fs::write(ro.join("probe"), "x").is_err(), "the mount is writable");
    let cache = ro.to_str().unwrap();
    let r = p.run(&["run", "pipe.yaml", "--cache", cache]).ok();
    assert!(r.stdout.contains("(read-only)") && r.stdout.contains("a: skip (cached)"), "{}", r.stdout);
    let r = p.run(&["status", "pipe.yaml", "--cache", cache]).ok();
    assert!(r.stdout.contains("cached"), "{}", r.stdout);
    let shown = p.run(&["show", "a.result", "-p", "pipe.yaml", "--cache", cache]).ok().stdout;
    assert!(fs::read_to_string(shown.trim()).unwrap().contains("alpha"));
    assert_eq!(p.run(&["verify", "--cache", cache]).code, 0);
    let r = p.run(&["run", "pipe.yaml", "--cache", cache, "--force", "a"]);
    assert!(r.code == 1 && r.stderr.contains("is read-only, and 1 would have to run: `a` (forced)"), "{}", r.stderr);
    // The private copy of the index is gone when the command ends.
    let tmp = tempfile::tempdir().unwrap();
    let out = p.cmd(&["status", "pipe.yaml", "--cache", cache]).env("TMPDIR", tmp.path()).output().unwrap();
    assert!(out.status.success());
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left in the temp folder: {left:?}");
}

/// A folder outside the cache with files of known modes, for planted links to point at.
fn victim(root: &std::path::Path) -> (std::path::PathBuf, Vec<(std::path::PathBuf, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    let v = root.join("victim");
    fs::create_dir_all(v.join("sub")).unwrap();
    fs::write(v.join("id_key"), "private").unwrap();
    fs::write(v.join("sub/notes"), "mine").unwrap();
    let modes = [(v.join("id_key"), 0o600), (v.join("sub/notes"), 0o640), (v.join("sub"), 0o700), (v.clone(), 0o750)];
    for (path, mode) in &modes {
        fs::set_permissions(path, fs::Permissions::from_mode(*mode)).unwrap();
    }
    (v, modes.to_vec())
}

fn untouched(modes: &[(std::path::PathBuf, u32)], after: &str) {
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in modes {
        let meta = fs::metadata(path).unwrap_or_else(|_| panic!("after {after}: {} was removed", path.display()));
        assert_eq!(meta.permissions().mode() & 0o777, *mode, "after {after}: {} changed mode", path.display());
    }
}

/// Make a stored folder writable, as whoever plants a link would, and plant one.
fn plant(folder: &std::path::Path, target: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = folder.to_path_buf();
    while dir.file_name().is_some() && dir.exists() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        if dir.ends_with("objects") || dir.ends_with("work") {
            break;
        }
        dir.pop();
    }
    fs::create_dir_all(folder).unwrap();
    std::os::unix::fs::symlink(target, folder.join("evil")).unwrap();
}

#[test]
fn links_planted_in_the_cache_are_never_followed_by_verify_gc_or_run() {
    let p = Project::new();
    p.write("data/gsm8k/train.jsonl", &common::gsm8k_rows(3));
    p.write("data/gsm8k/test.jsonl", &common::gsm8k_rows(2));
    p.write("pipe.yaml", "name: links\nstages:\n  gsm8k: { kind: download, with: { dataset: data/gsm8k } }\n");
    p.run(&["run", "pipe.yaml"]).ok();
    let (target, modes) = victim(p.root());
    let dataset = std::path::PathBuf::from(p.run(&["show", "gsm8k.dataset", "-p", "pipe.yaml"]).ok().stdout.trim());

    // In a stored object: verify calls it damaged, names the link, and removes the object.
    plant(&dataset, &target);
    let r = p.run(&["verify", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("holds a symbolic link"), "{}{}", r.stdout, r.stderr);
    untouched(&modes, "verify");
    assert!(target.join("id_key").exists() && !dataset.exists());

    // Again, found by run's own check: the object is remade, not served.
    p.run(&["run", "pipe.yaml"]).ok();
    plant(&dataset, &target);
    let r = p.run(&["run", "pipe.yaml"]).ok();
    assert!(r.stdout.contains("holds a symbolic link"), "{}", r.stdout);
    untouched(&modes, "run replacing a damaged object");

    // In an object no record reaches: gc removes the link, not what it points to.
    plant(&p.cache().join("objects/0000000000000000/x"), &target);
    p.run(&["gc"]).ok();
    untouched(&modes, "gc");
    assert!(!p.cache().join("objects/0000000000000000").exists());

    // In a stage's work folder (its outputs of an earlier attempt are cleared on start).
    let fp = fs::read_dir(p.cache().join("records"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().trim_end_matches(".json").to_string())
        .next()
        .unwrap();
    plant(&p.cache().join("work").join(&fp).join("out"), &target);
    p.run(&["run", "pipe.yaml", "--force", "gsm8k"]).ok();
    untouched(&modes, "a forced run clearing its work folder");
    assert_eq!(fs::read_to_string(target.join("id_key")).unwrap(), "private");
}

#[test]
fn the_cache_is_never_group_or_world_writable_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let p = Project::new();
    p.write("pipe.yaml", CHAIN);
    let mut cmd = p.cmd(&["run", "pipe.yaml"]);
    // SAFETY: umask in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o000);
            Ok(())
        });
    }
    assert!(cmd.output().unwrap().status.success());
    for path in std::iter::once(p.cache()).chain(walk(&p.cache())) {
        let mode = fs::symlink_metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "{} is {:o}", path.display(), mode & 0o777);
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
