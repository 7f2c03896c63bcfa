//! The curves people look at, from a training stage's per-step log: SVG
//! charts (plotters) of reward (total and per function), reward_std, KL,
//! completion length, clipped ratios, loss, gradient norm and learning rate
//! against the step, and an `index.html` that shows them together.

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

/// Series of a chart found in the log: (key, points (step, value)).
fn series(chart: &Chart, lines: &[Value]) -> Vec<(String, Vec<(f64, f64)>)> {
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
    keys.into_iter()
        .map(|k| {
            let pts: Vec<(f64, f64)> = lines
                .iter()
                .filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(&k)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            (k, pts)
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect()
}

fn draw(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (_, pts) in series {
        for &(x, y) in pts {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { y0.abs().max(1e-3) * 0.1 };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if y.abs() >= 1e-2 || *y == 0.0 { format!("{y:.3}") } else { format!("{y:.1e}") })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Render the charts the log has data for into `out` (created), with an
/// `index.html` showing them; returns the path of index.html.
pub fn render(log: &Path, out: &Path, title: &str) -> Result<PathBuf> {
    let text = fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", log.display(), i + 1)))
        .collect::<Result<_>>()?;
    fs::create_dir_all(out)?;
    let mut figures = Vec::new();
    for chart in CHARTS {
        let s = series(chart, &lines);
        if s.is_empty() {
            continue;
        }
        draw(&out.join(chart.file), chart.title, &s)?;
        figures.push(chart.file);
    }
    let imgs: String = figures.iter().map(|f| format!("<img src=\"{f}\" alt=\"{f}\">\n")).collect();
    let title = html_escape(title);
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n\
         <style>body{{font-family:sans-serif;margin:16px}} img{{width:720px;max-width:48%;margin:4px;border:1px solid #ddd}}</style>\n\
         </head><body>\n<h1>{title}</h1>\n<p>{} steps, from {}</p>\n{imgs}</body></html>\n",
        lines.len(),
        html_escape(&log.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default())
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
        let index = render(&log, &dir.path().join("plots"), "grpo").unwrap();
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
            assert!(html.contains(f), "{f} not in index");
            let svg = fs::read_to_string(dir.path().join("plots").join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{f} has no line");
        }
        // Per-function means are series of the reward chart; stds are not.
        let reward = fs::read_to_string(dir.path().join("plots/reward.svg")).unwrap();
        assert!(reward.contains("rewards/strict_format/mean") && !reward.contains("/std"));
        // No data, no chart.
        assert!(!html.contains("completion_length.svg"));
        // A title is text, never markup.
        let index = render(&log, &dir.path().join("plots2"), "<img src=x onerror=alert(1)>").unwrap();
        let html = fs::read_to_string(&index).unwrap();
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;") && !html.contains("<img src=x"), "{html}");
    }
}
