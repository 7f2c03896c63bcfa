//! `r1pipe plot` as people use it: a sweep's members overlaid on one page,
//! with the evaluation curves and the best step marked, checked in a real
//! headless browser (chromium): the page loads from its folder with no
//! server, every chart is laid out as SVG, and each series has its line and
//! its legend entry. Selectors: `grpo@*`, a matrix stage's base name, and a
//! stage without curves naming those with.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const SWEEP: &str = r#"
name: sweep
seed: 3
device: cpu
stages:
  gsm8k: { kind: download, with: { dataset: data/gsm8k } }
  prompts: { kind: format, with: { data: "${gsm8k.dataset}" } }
  grpo:
    kind: grpo
    matrix:
      lr: [1.0e-4, 3.0e-4]
    with:
      model: models/tiny
      train: "${prompts.train}"
      rewards: r1-gsm8k
      learning_rate: "${item.lr}"
      max_steps: 4
      num_generations: 2
      per_device_train_batch_size: 2
      max_completion_length: 8
      eval_dataset: "${prompts.test}"
      eval_steps: 2
      load_best_model_at_end: true
      metric_for_best_model: eval/reward
"#;

/// A page that loads the plots page in a frame and writes what the browser
/// made of it (per figure: its SVG's laid-out size, lines and texts) into its
/// own DOM, which `--dump-dom` prints.
const PROBE: &str = r#"<!doctype html><html><body>
<iframe id="f" src="PAGE" style="width:1200px;height:800px"></iframe>
<script>
document.getElementById('f').onload = () => {
  const d = document.getElementById('f').contentDocument;
  const figures = [...d.querySelectorAll('figure')].map(fig => {
    const svg = fig.querySelector('svg');
    const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
    // The SVG DOM (not the markup): a parsed SVG element, and its curves as
    // polylines of more than two points (legend swatches have two).
    return { id: fig.id, svg: !!svg && svg.namespaceURI === 'http://www.w3.org/2000/svg' && !!svg.createSVGPoint,
             width: box.width, height: box.height,
             curves: svg ? [...svg.querySelectorAll('polyline')].filter(p => p.points.numberOfItems > 2).length : 0,
             texts: svg ? [...svg.querySelectorAll('text')].map(t => t.textContent.trim()) : [] };
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({ title: d.title, figures });
  document.body.appendChild(pre);
};
</script></body></html>"#;

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_string)
}

/// Run the browser with `args` to its end, within two minutes: it runs in a
/// process group of its own (its renderer and GPU processes too), killed
/// whole at the deadline so that a browser that hangs fails the test instead
/// of holding the suite. Returns (stdout, stderr).
fn browse(browser: &str, args: &[String], dir: &Path) -> (String, String) {
    let (out, err) = (dir.join("browser.out"), dir.join("browser.err"));
    let mut child = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(args)
        .process_group(0)
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            // SAFETY: a signal to the group this test started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("the browser did not finish within 120 s: {}", fs::read_to_string(&err).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (fs::read_to_string(&out).unwrap_or_default(), fs::read_to_string(&err).unwrap_or_default())
}

/// What the browser made of `page`, or why it could not say.
fn probe(browser: &str, page: &Path, dir: &Path) -> Value {
    let probe = dir.join("probe.html");
    fs::write(&probe, PROBE.replace("PAGE", &format!("file://{}", page.display()))).unwrap();
    let args = ["--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom"].map(String::from);
    let (dom, err) = browse(browser, &[&args[..], &[format!("file://{}", probe.display())]].concat(), dir);
    let json = dom
        .split("<pre id=\"probe\">")
        .nth(1)
        .and_then(|t| t.split("</pre>").next())
        .unwrap_or_else(|| panic!("the browser wrote no probe:\n{dom}\n{err}"));
    serde_json::from_str(&json.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\""))
        .unwrap()
}

#[test]
fn a_sweeps_members_overlay_on_one_page_that_a_browser_lays_out() {
    let Some(browser) = chromium() else {
        common::skip("no chromium to render the page in (apt-get install chromium)");
        return;
    };
    let p = common::tiny_project(6, 8);
    p.write("p.yaml", SWEEP);
    p.run(&["run", "p.yaml", "-q"]).ok();
    let out = p.root().join("page");
    let page = p.run(&["plot", "grpo@*", "-p", "p.yaml", "--smooth", "0.6", "--out", out.to_str().unwrap()]).ok();
    let page = Path::new(page.stdout.trim()).to_path_buf();
    assert_eq!(page, out.join("index.html"));

    let seen = probe(&browser, &page, p.root());
    let figures = seen["figures"].as_array().unwrap();
    let figure = |id: &str| figures.iter().find(|f| f["id"] == id).unwrap_or_else(|| panic!("no {id} chart in {seen}"));
    for id in ["reward", "kl", "entropy", "loss", "eval_accuracy", "eval_reward"] {
        let f = figure(id);
        assert!(f["svg"].as_bool().unwrap(), "{id}: not an SVG element: {f}");
        assert!(f["width"].as_f64().unwrap() > 300.0 && f["height"].as_f64().unwrap() > 200.0, "{id}: {f}");
    }
    let texts = |id: &str| -> Vec<String> {
        figure(id)["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
    };
    // Each member's curve is in the legend of every chart, by its member name.
    for member in ["grpo@lr-1e-4", "grpo@lr-3e-4"] {
        for (id, key) in [("loss", "loss"), ("entropy", "entropy"), ("eval_accuracy", "eval/accuracy_strict")] {
            let want = format!("{member} {key}");
            assert!(texts(id).contains(&want), "{id}: no `{want}` in {:?}", texts(id));
        }
        // The best step of each member is marked where evaluation is drawn.
        assert!(
            texts("eval_reward").iter().any(|t| t.starts_with("best step ") && t.ends_with(&format!("({member})"))),
            "{:?}",
            texts("eval_reward")
        );
    }
    // Smoothed: a faint raw curve under each smoothed one; two members: four curves.
    let loss = figure("loss");
    assert_eq!(loss["curves"].as_u64().unwrap(), 4, "{loss}");
    // Ticks read as numbers of their axis.
    assert!(!texts("kl").iter().any(|t| t.contains("e-2") || t.starts_with("-0.0000000")), "{:?}", texts("kl"));

    // A screenshot of the page, as a person sees it.
    let shot = p.root().join("page.png");
    let args = [
        "--window-size=1000,1400".to_string(),
        format!("--screenshot={}", shot.display()),
        format!("file://{}", page.display()),
    ];
    let (_, err) = browse(&browser, &args, p.root());
    let png = fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}): {err}"));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{} bytes", png.len());
}

#[test]
fn plot_selects_stages_as_run_does_and_names_those_with_curves() {
    let p = common::tiny_project(6, 8);
    p.write("p.yaml", &SWEEP.replace("max_steps: 4", "max_steps: 2"));
    p.run(&["run", "p.yaml", "-q"]).ok();
    // A matrix stage's base name: all its members.
    let page = p.run(&["plot", "grpo", "-p", "p.yaml"]).ok();
    let html = fs::read_to_string(page.stdout.trim()).unwrap();
    assert!(html.contains("grpo@lr-1e-4") && html.contains("grpo@lr-3e-4"), "{html}");
    // One member alone.
    let page = p.run(&["plot", "grpo@lr-1e-4", "-p", "p.yaml", "--wall-clock"]).ok();
    let html = fs::read_to_string(page.stdout.trim()).unwrap();
    assert!(!html.contains("grpo@lr-3e-4") && html.contains("training time (s)"), "{html}");
    // A stage without curves names the stages with them.
    let r = p.run(&["plot", "prompts", "-p", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("has no curves to plot; stages with curves: grpo@lr-1e-4, grpo@lr-3e-4"), "{}", r.stderr);
    // An unknown stage lists the stages.
    let r = p.run(&["plot", "grpo@lr-9", "-p", "p.yaml"]);
    assert!(r.stderr.contains("no stage `grpo@lr-9`") && r.stderr.contains("grpo@lr-1e-4"), "{}", r.stderr);
    // A smoothing weight that is not one.
    let r = p.run(&["plot", "grpo", "-p", "p.yaml", "--smooth", "1.5"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not a weight in [0, 1)"), "{}", r.stderr);
}
