//! The curves people look at, from training stages' per-step logs: SVG
//! charts (plotters) of reward (total and per function), reward_std, KL,
//! entropy, evaluation during training (the best step marked), completion
//! length, clipped ratios, loss, gradient norm and learning rate, against the
//! step or the training time, one run or several overlaid, optionally
//! smoothed as TensorBoard does; and an `index.html` that holds them inline
//! with each run's settings.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

/// One chart: a file name, a title, and which log keys it draws.
struct Chart {
    file: &'static str,
    title: &'static str,
    /// Log keys drawn; a trailing `*` takes every key with that prefix and a `/mean` suffix.
    keys: &'static [&'static str],
}

const CHARTS: &[Chart] = &[
    Chart { file: "reward.svg", title: "reward (total and per function)", keys: &["reward", "rewards/*"] },
    Chart {
        file: "reward_std.svg",
        title: "reward_std (mean within-group std)",
        keys: &["reward_std", "frac_reward_zero_std"],
    },
    Chart { file: "kl.svg", title: "KL to the reference", keys: &["kl"] },
    Chart { file: "entropy.svg", title: "entropy of the policy over completion tokens", keys: &["entropy"] },
    Chart {
        file: "eval_accuracy.svg",
        title: "evaluation during training: accuracy and format (eval_dataset)",
        keys: &["eval/accuracy_strict", "eval/accuracy_flexible", "eval/strict_format", "eval/truncation_rate"],
    },
    Chart { file: "eval_reward.svg", title: "evaluation during training: reward", keys: &["eval/reward"] },
    Chart {
        file: "completion_length.svg",
        title: "completions/mean_length (tokens)",
        keys: &["completions/mean_length"],
    },
    Chart {
        file: "clipped.svg",
        title: "clipped completions and clipped ratios",
        keys: &["completions/clipped_ratio", "clip_ratio/region_mean"],
    },
    Chart { file: "loss.svg", title: "loss", keys: &["loss"] },
    Chart { file: "grad_norm.svg", title: "grad_norm (before clipping)", keys: &["grad_norm"] },
    Chart { file: "learning_rate.svg", title: "learning_rate", keys: &["learning_rate"] },
];

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One run to draw: a training stage's per-step log, and what the page says of it.
#[derive(Debug, Clone)]
pub struct RunLog {
    /// How the run is named in legends (`sft@lr-1e-4`, `p2/grpo`).
    pub label: String,
    pub log: PathBuf,
    /// The step whose model was kept as the best (`load_best_model_at_end`): marked on the evaluation charts.
    pub best_step: Option<f64>,
    /// The run's settings, shown on the page.
    pub config: Option<Value>,
}

/// How the curves are drawn.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    /// TensorBoard's smoothing: an exponential moving average with this weight
    /// (0: none, 0.6: TensorBoard's default), debiased at the start; the raw
    /// curve stays, faint, beneath it.
    pub smooth: f64,
    /// Against training time (the sum of `step_time`, in seconds) instead of the step.
    pub wall_clock: bool,
}

/// A curve: its legend label (`None`: not in the legend, as the faint raw
/// curve beneath a smoothed one), its colour and dash, and its points.
struct Line {
    label: Option<String>,
    color: RGBAColor,
    dashed: bool,
    /// Drawn wider: a chart's first series (the total reward), which would
    /// otherwise hide under an equal per-function one.
    wide: bool,
    points: Vec<(f64, f64)>,
}

/// The keys of a chart found in a log (a trailing `*` in a chart key takes
/// every key with that prefix and a `/mean` suffix: one per reward function).
fn chart_keys(chart: &Chart, lines: &[Value]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for k in chart.keys {
        match k.strip_suffix('*') {
            Some(prefix) => {
                let mut found: Vec<String> = lines
                    .iter()
                    .filter_map(Value::as_object)
                    .flat_map(|m| m.keys())
                    .filter(|x| x.starts_with(prefix) && x.ends_with("/mean"))
                    .cloned()
                    .collect();
                found.sort();
                found.dedup();
                keys.extend(found);
            }
            None => keys.push(k.to_string()),
        }
    }
    keys
}

/// Step → x: the step itself, or the training time up to and including it.
fn x_of(lines: &[Value], wall_clock: bool) -> impl Fn(f64) -> Option<f64> {
    let mut clock: Vec<(f64, f64)> = Vec::new();
    if wall_clock {
        let mut t = 0.0;
        for l in lines {
            if let (Some(step), Some(dt)) =
                (l.get("step").and_then(Value::as_f64), l.get("step_time").and_then(Value::as_f64))
            {
                t += dt;
                clock.push((step, t));
            }
        }
    }
    move |step| {
        if !wall_clock {
            return Some(step);
        }
        // Steps ascend in a log (a resumed run's is cut back to its checkpoint first).
        clock.get(clock.partition_point(|(s, _)| *s < step)).map(|(_, t)| *t)
    }
}

/// TensorBoard's smoothing: a debiased exponential moving average.
fn smoothed(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            last = last * weight + (1.0 - weight) * y;
            (x, last / (1.0 - weight.powi(i as i32 + 1)))
        })
        .collect()
}

/// A tick label that reads well for an axis spanning `span`: as many decimals
/// as the span needs, and a value within rounding noise of zero as `0`
/// (never `-4.2e-22`).
fn tick(y: f64, span: f64) -> String {
    let span = if span > 0.0 && span.is_finite() { span } else { y.abs().max(1.0) };
    if y.abs() < span * 1e-9 {
        return "0".into();
    }
    let magnitude = y.abs().max(span);
    if !(1e-4..1e6).contains(&magnitude) {
        return format!("{y:.2e}");
    }
    let decimals = (2.0 - span.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{y:.decimals$}")
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

/// One chart: the curves on the left, their legend on the right (never over
/// the data), best steps as dashed vertical lines.
fn draw(path: &Path, title: &str, wall_clock: bool, lines: &[Line], marks: &[(String, f64)]) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for l in lines {
        for &(x, y) in &l.points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { y0.abs().max(1e-3) * 0.1 };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let span = y1 - y0;
    // Tall enough for the legend beside it.
    let rows = lines.iter().filter(|l| l.label.is_some()).count() + marks.len();
    let height = (60 + 20 * rows as u32).max(420);
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (plot_area, legend_area) = root.split_horizontally(700);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    // Steps are whole numbers: at most one label per step.
    let x_labels = if wall_clock { 10 } else { ((x1 - x0) as usize + 1).min(10) };
    chart
        .configure_mesh()
        .x_desc(if wall_clock { "training time (s)" } else { "step" })
        .x_labels(x_labels)
        .x_label_formatter(&|x| if wall_clock { tick(*x, x1 - x0) } else { format!("{x:.0}") })
        .y_label_formatter(&|y| tick(*y, span))
        .draw()
        .map_err(plot_err)?;
    for (_, step) in marks {
        chart
            .draw_series(DashedLineSeries::new(vec![(*step, y0), (*step, y1)], 6, 4, BLACK.mix(0.5).stroke_width(1)))
            .map_err(plot_err)?;
    }
    for l in lines {
        let style = ShapeStyle::from(&l.color).stroke_width(if l.wide { 4 } else { 2 });
        if l.dashed {
            chart.draw_series(DashedLineSeries::new(l.points.iter().copied(), 8, 4, style)).map_err(plot_err)?;
        } else {
            chart.draw_series(LineSeries::new(l.points.iter().copied(), style)).map_err(plot_err)?;
        }
    }
    // The legend, beside the chart: one row per curve, then the marks.
    let rows = lines
        .iter()
        .filter_map(|l| Some((l.label.clone()?, l.color, l.dashed)))
        .chain(marks.iter().map(|(label, _)| (label.clone(), BLACK.mix(0.5), true)));
    for (i, (label, color, dashed)) in rows.enumerate() {
        let y = 40 + 20 * i as i32;
        let seg = vec![(8, y), (32, y)];
        let stroke = ShapeStyle::from(&color).stroke_width(2);
        if dashed {
            legend_area.draw(&PathElement::new(vec![(8, y), (16, y)], stroke)).map_err(plot_err)?;
            legend_area.draw(&PathElement::new(vec![(22, y), (32, y)], stroke)).map_err(plot_err)?;
        } else {
            legend_area.draw(&PathElement::new(seg, stroke)).map_err(plot_err)?;
        }
        legend_area.draw(&Text::new(label, (38, y - 7), ("sans-serif", 13))).map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn read_log(log: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", log.display(), i + 1)))
        .collect()
}

/// Render the charts the logs have data for into `out` (created), one run's
/// curves or several runs overlaid (a colour per run, a dash per series),
/// with an `index.html` that holds them inline (it opens from the folder, no
/// server); returns the path of index.html.
pub fn render(runs: &[RunLog], out: &Path, title: &str, style: Style) -> Result<PathBuf> {
    let logs: Vec<Vec<Value>> = runs.iter().map(|r| read_log(&r.log)).collect::<Result<_>>()?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let overlay = runs.len() > 1;
    // Each run's step → x, once for all its charts.
    let xs: Vec<_> = logs.iter().map(|log| x_of(log, style.wall_clock)).collect();
    let mut figures = Vec::new();
    for chart in CHARTS {
        let mut lines = Vec::new();
        let mut marks = Vec::new();
        for (r, ((run, log), x)) in runs.iter().zip(&logs).zip(&xs).enumerate() {
            let keys = chart_keys(chart, log);
            for (k, key) in keys.iter().enumerate() {
                let points: Vec<(f64, f64)> = log
                    .iter()
                    .filter_map(|l| Some((x(l.get("step")?.as_f64()?)?, l.get(key)?.as_f64()?)))
                    .filter(|(_, y)| y.is_finite())
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let (color, dashed) =
                    if overlay { (COLORS[r % COLORS.len()], k > 0) } else { (COLORS[k % COLORS.len()], false) };
                let color = color.to_rgba();
                let label = if overlay { format!("{} {key}", run.label) } else { key.clone() };
                if style.smooth > 0.0 {
                    let smooth = smoothed(&points, style.smooth);
                    lines.push(Line { label: None, color: color.mix(0.3), dashed, wide: false, points });
                    lines.push(Line { label: Some(label), color, dashed, wide: k == 0, points: smooth });
                } else {
                    lines.push(Line { label: Some(label), color, dashed, wide: k == 0, points });
                }
            }
            if chart.keys.iter().any(|k| k.starts_with("eval/")) && !lines.is_empty() {
                if let Some(step) = run.best_step.and_then(&x) {
                    let who = if overlay { format!(" ({})", run.label) } else { String::new() };
                    marks.push((format!("best step {}{who}", run.best_step.unwrap_or_default()), step));
                }
            }
        }
        if lines.is_empty() {
            continue;
        }
        draw(&out.join(chart.file), chart.title, style.wall_clock, &lines, &marks)?;
        figures.push(chart.file);
    }
    let mut body = String::new();
    for f in &figures {
        let svg = fs::read_to_string(out.join(f)).with_context(|| format!("reading {}", out.join(f).display()))?;
        body.push_str(&format!("<figure id=\"{}\">{svg}</figure>\n", f.trim_end_matches(".svg")));
    }
    for (run, log) in runs.iter().zip(&logs) {
        let steps = log.iter().filter(|l| l.get("loss").is_some()).count();
        body.push_str(&format!(
            "<details><summary>{} — {steps} steps, from {}</summary>\n",
            html_escape(&run.label),
            html_escape(&run.log.display().to_string())
        ));
        if let Some(config) = &run.config {
            body.push_str(&format!("<pre>{}</pre>\n", html_escape(&serde_json::to_string_pretty(config)?)));
        }
        body.push_str("</details>\n");
    }
    let title = html_escape(title);
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n\
         <style>body{{font-family:sans-serif;margin:16px}} figure{{display:inline-block;margin:4px;border:1px solid #ddd}} \
         figure svg{{width:960px;max-width:100%;height:auto}} pre{{background:#f6f6f6;padding:8px}}</style>\n\
         </head><body>\n<h1>{title}</h1>\n{body}</body></html>\n"
    );
    let index = out.join("index.html");
    crate::common::fsutil::write_file(&index, html)?;
    Ok(index)
}

/// Text as HTML shows it, never as markup.
fn html_escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chart_with_data_is_drawn_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let lines: String = (1..=5)
            .map(|s| {
                serde_json::json!({"step": s, "reward": s as f64 * 0.1, "rewards/correctness/mean": 0.0,
                    "rewards/strict_format/mean": s as f64 * 0.05, "rewards/strict_format/std": 0.1,
                    "kl": 0.001 * s as f64, "loss": 1.0 / s as f64, "grad_norm": 0.5, "learning_rate": 1e-6,
                    "entropy": 1.0 - 0.1 * s as f64, "eval/accuracy_strict": 0.1 * s as f64, "eval/reward": 0.2})
                .to_string()
                    + "\n"
            })
            .collect();
        fs::write(&log, lines).unwrap();
        let run = |label: &str| RunLog { label: label.into(), log: log.clone(), best_step: Some(3.0), config: None };
        let index = render(&[run("grpo")], &dir.path().join("plots"), "grpo", Style::default()).unwrap();
        let html = fs::read_to_string(&index).unwrap();
        for f in [
            "reward.svg",
            "kl.svg",
            "loss.svg",
            "grad_norm.svg",
            "learning_rate.svg",
            "entropy.svg",
            "eval_accuracy.svg",
            "eval_reward.svg",
        ] {
            assert!(html.contains(&format!("<figure id=\"{}\"><svg", f.trim_end_matches(".svg"))), "{f} not in index");
            let svg = fs::read_to_string(dir.path().join("plots").join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{f} has no line");
        }
        // Per-function means are series of the reward chart; stds are not.
        let reward = fs::read_to_string(dir.path().join("plots/reward.svg")).unwrap();
        assert!(reward.contains("rewards/strict_format/mean") && !reward.contains("/std"));
        // No data, no chart.
        assert!(!html.contains("id=\"completion_length\"") && !dir.path().join("plots/completion_length.svg").exists());
        // A title is text, never markup.
        let index =
            render(&[run("grpo")], &dir.path().join("plots2"), "<img src=x onerror=alert(1)>", Style::default())
                .unwrap();
        let html = fs::read_to_string(&index).unwrap();
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;") && !html.contains("<img src=x"), "{html}");
        // The best step is marked on the evaluation charts, and only there.
        let eval = fs::read_to_string(dir.path().join("plots/eval_accuracy.svg")).unwrap();
        assert!(eval.contains("best step 3"), "no best-step mark");
        assert!(!reward.contains("best step"));

        // Two runs overlaid: each series once per run, named by its run.
        let index = render(&[run("a"), run("b")], &dir.path().join("plots3"), "a, b", Style::default()).unwrap();
        let loss = fs::read_to_string(dir.path().join("plots3/loss.svg")).unwrap();
        assert!(loss.contains("\na loss\n") && loss.contains("\nb loss\n"), "{loss}");
        assert!(fs::read_to_string(index).unwrap().contains("<svg"), "the page does not hold the charts inline");
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_moving_average() {
        // Reference, in float64 by hand: weight 0.5 over 1, 3, 5.
        // ema: 0.5, 0.5*0.5+0.5*3 = 1.75, 1.75*0.5+0.5*5 = 3.375; debiased by 1-0.5^i.
        let got = smoothed(&[(1.0, 1.0), (2.0, 3.0), (3.0, 5.0)], 0.5);
        let want = [1.0, 1.75 / 0.75, 3.375 / 0.875];
        for ((_, y), w) in got.iter().zip(want) {
            assert!((y - w).abs() < 1e-12, "{got:?}");
        }
        // Weight 0 leaves the curve as it is.
        assert_eq!(smoothed(&[(1.0, 2.0), (2.0, -1.0)], 0.0), vec![(1.0, 2.0), (2.0, -1.0)]);
    }

    #[test]
    fn ticks_read_as_numbers_of_their_axis() {
        // Rounding noise around zero is zero, never -4.2e-22.
        assert_eq!(tick(-4.2e-22, 1e-4), "0");
        assert_eq!(tick(0.25, 1.0), "0.25");
        assert_eq!(tick(10.79645, 4.5e-5), "10.796450");
        assert_eq!(tick(1234.0, 2000.0), "1234");
        assert_eq!(tick(3e-6, 1e-5), "3.00e-6");
    }
}
