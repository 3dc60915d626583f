//! Plain SVG charts for the dashboard, drawn on the server from a job's artifacts
//! (`report.json`, `search.json`, `training.json`).
//!
//! Why server-side SVG and not a vendored JavaScript library: three chart shapes (bars, a
//! scatter, lines) in ~250 lines of Rust that the tests exercise, no third-party code to keep
//! up to date inside the binary, charts that also work from `curl` and in a report, and no
//! script inside the page beyond the dashboard's own. Every label is escaped.

use serde_json::Value;
use std::fmt::Write;

/// The palette (colour-blind safe, Okabe–Ito).
pub const BLUE: &str = "#0072b2";
pub const ORANGE: &str = "#e69f00";
pub const GREEN: &str = "#009e73";
pub const RED: &str = "#d55e00";
pub const GREY: &str = "#777777";

/// At most this many layers are drawn; the title says when more were left out.
pub const MAX_BARS: usize = 150;

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub values: Vec<f64>,
}

/// Escapes text for SVG content and attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A number for a tick label: short, no trailing noise.
pub fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn finite_max(vals: impl Iterator<Item = f64>) -> f64 {
    vals.filter(|v| v.is_finite()).fold(0.0, f64::max)
}

fn open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" font-family=\"system-ui,sans-serif\" font-size=\"12\"><title>{t}</title><rect width=\"100%\" height=\"100%\" fill=\"#fff\"/><text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"600\">{t}</text>",
        t = esc(title)
    )
}

fn legend(s: &mut String, x: f64, y: f64, items: &[(&str, &str)]) {
    let mut x = x;
    for (name, color) in items {
        let _ = write!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{y}\">{}</text>",
            y - 9.0,
            x + 14.0,
            esc(name)
        );
        x += 24.0 + 7.0 * name.chars().count() as f64;
    }
}

/// Horizontal bars, one group per label, one bar per series, each series on its own scale
/// (its maximum is the full width) with the value written beside the bar.
pub fn hbars(title: &str, labels: &[String], series: &[Series]) -> String {
    let n = labels.len().min(MAX_BARS);
    let title = if labels.len() > n {
        format!("{title} (first {n} of {})", labels.len())
    } else {
        title.to_string()
    };
    let (left, width, bar, gap) = (190.0, 640.0, 9.0, 6.0);
    let group = bar * series.len() as f64 + gap;
    let top = 44.0;
    let h = top + group * n as f64 + 12.0;
    let mut s = open(left + width + 70.0, h, &title);
    legend(
        &mut s,
        left,
        34.0,
        &series.iter().map(|x| (x.name, x.color)).collect::<Vec<_>>(),
    );
    let maxes: Vec<f64> = series
        .iter()
        .map(|x| finite_max(x.values.iter().copied()).max(f64::MIN_POSITIVE))
        .collect();
    for (i, label) in labels.iter().take(n).enumerate() {
        let y = top + group * i as f64;
        let short: String = if label.chars().count() > 28 {
            let tail: String = label
                .chars()
                .rev()
                .take(27)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("…{tail}")
        } else {
            label.clone()
        };
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\"><title>{}</title>{}</text>",
            left - 6.0,
            y + group / 2.0,
            esc(label),
            esc(&short)
        );
        for (k, (ser, max)) in series.iter().zip(&maxes).enumerate() {
            let v = ser.values.get(i).copied().unwrap_or(f64::NAN);
            let len = if v.is_finite() {
                (v / max).clamp(0.0, 1.0) * width
            } else {
                0.0
            };
            let by = y + bar * k as f64;
            let _ = write!(
                s,
                "<rect x=\"{left}\" y=\"{by}\" width=\"{len:.1}\" height=\"{}\" fill=\"{}\"><title>{}: {}</title></rect><text x=\"{:.1}\" y=\"{}\" font-size=\"9\">{}</text>",
                bar - 1.0,
                ser.color,
                esc(ser.name),
                tick(v),
                left + len + 3.0,
                by + bar - 1.5,
                if v.is_finite() { tick(v) } else { "–".into() }
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// Axes with ticks for a plot area; returns the mapping of data to pixels.
struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    lo: (f64, f64),
    hi: (f64, f64),
}

impl Frame {
    fn new(lo: (f64, f64), hi: (f64, f64)) -> Frame {
        let pad = |a: f64, b: f64| {
            if (b - a).abs() < 1e-12 {
                (a - 0.5, b + 0.5)
            } else {
                let p = (b - a) * 0.05;
                (a - p, b + p)
            }
        };
        let (xl, xh) = pad(lo.0, hi.0);
        let (yl, yh) = pad(lo.1, hi.1);
        Frame {
            x0: 70.0,
            x1: 800.0,
            y0: 330.0,
            y1: 44.0,
            lo: (xl, yl),
            hi: (xh, yh),
        }
    }
    fn px(&self, x: f64) -> f64 {
        self.x0 + (x - self.lo.0) / (self.hi.0 - self.lo.0) * (self.x1 - self.x0)
    }
    fn py(&self, y: f64) -> f64 {
        self.y0 - (y - self.lo.1) / (self.hi.1 - self.lo.1) * (self.y0 - self.y1)
    }
    fn draw(&self, s: &mut String, xlabel: &str, ylabel: &str) {
        let _ = write!(
            s,
            "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#333\"/><line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{3}\" stroke=\"#333\"/>",
            self.x0, self.y0, self.x1, self.y1
        );
        for k in 0..=4 {
            let f = k as f64 / 4.0;
            let (xv, yv) = (
                self.lo.0 + f * (self.hi.0 - self.lo.0),
                self.lo.1 + f * (self.hi.1 - self.lo.1),
            );
            let (x, y) = (self.px(xv), self.py(yv));
            let _ = write!(
                s,
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>",
                self.y0 + 16.0,
                tick(xv),
                self.x0 - 6.0,
                y + 4.0,
                tick(yv),
                self.x0 + 1.0,
                self.x1
            );
        }
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text><text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            (self.x0 + self.x1) / 2.0,
            self.y0 + 34.0,
            esc(xlabel),
            (self.y0 + self.y1) / 2.0,
            esc(ylabel)
        );
    }
}

/// One point of a scatter: where, its name, and how it is drawn.
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub name: String,
    /// Filled when it meets the goal; hollow when rejected.
    pub meets: bool,
    pub frontier: bool,
    pub chosen: bool,
}

/// A search's candidates: ratio against metric, the frontier joined by a line, the chosen
/// point ringed and named.
pub fn scatter(title: &str, xlabel: &str, ylabel: &str, points: &[Point]) -> String {
    let pts: Vec<&Point> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    let mut s = open(830.0, 380.0, title);
    legend(
        &mut s,
        70.0,
        34.0,
        &[
            ("meets the goal", GREEN),
            ("rejected", RED),
            ("frontier", GREY),
            ("chosen", BLUE),
        ],
    );
    if pts.is_empty() {
        s.push_str("<text x=\"70\" y=\"120\">no candidate has a metric</text></svg>");
        return s;
    }
    let lo = (
        pts.iter().map(|p| p.x).fold(f64::INFINITY, f64::min),
        pts.iter().map(|p| p.y).fold(f64::INFINITY, f64::min),
    );
    let hi = (
        pts.iter().map(|p| p.x).fold(f64::NEG_INFINITY, f64::max),
        pts.iter().map(|p| p.y).fold(f64::NEG_INFINITY, f64::max),
    );
    let f = Frame::new(lo, hi);
    f.draw(&mut s, xlabel, ylabel);
    let mut front: Vec<&&Point> = pts.iter().filter(|p| p.frontier).collect();
    front.sort_by(|a, b| a.x.total_cmp(&b.x));
    if front.len() > 1 {
        let d: Vec<String> = front
            .iter()
            .map(|p| format!("{:.1},{:.1}", f.px(p.x), f.py(p.y)))
            .collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{GREY}\" stroke-dasharray=\"4 3\"/>",
            d.join(" ")
        );
    }
    for p in &pts {
        let (x, y) = (f.px(p.x), f.py(p.y));
        let c = if p.meets { GREEN } else { RED };
        let fill = if p.meets { c } else { "#fff" };
        let _ = write!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{fill}\" stroke=\"{c}\" stroke-width=\"1.5\"><title>{}: {} / {}</title></circle>",
            esc(&p.name),
            tick(p.x),
            tick(p.y)
        );
        if p.chosen {
            let _ = write!(
                s,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"9\" fill=\"none\" stroke=\"{BLUE}\" stroke-width=\"2\" class=\"chosen\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{BLUE}\" font-weight=\"600\">chosen: {}</text>",
                x + 12.0,
                y - 10.0,
                esc(&p.name)
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// Lines over a shared x axis (epochs), all series on one y scale.
pub fn lines(title: &str, xlabel: &str, ylabel: &str, xs: &[f64], series: &[Series]) -> String {
    let mut s = open(830.0, 380.0, title);
    legend(
        &mut s,
        70.0,
        34.0,
        &series.iter().map(|x| (x.name, x.color)).collect::<Vec<_>>(),
    );
    let ys = series
        .iter()
        .flat_map(|x| x.values.iter().copied())
        .filter(|v| v.is_finite());
    let (ylo, yhi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if xs.is_empty() || !ylo.is_finite() {
        s.push_str("<text x=\"70\" y=\"120\">nothing to draw</text></svg>");
        return s;
    }
    let xlo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let xhi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let f = Frame::new((xlo, ylo), (xhi, yhi));
    f.draw(&mut s, xlabel, ylabel);
    for ser in series {
        let pts: Vec<String> = xs
            .iter()
            .zip(&ser.values)
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", f.px(*x), f.py(*y)))
            .collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"><title>{}</title></polyline>",
            pts.join(" "),
            ser.color,
            esc(ser.name)
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(
                s,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{}\"/>",
                ser.color
            );
        }
    }
    s.push_str("</svg>");
    s
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The compressed layers of `report.json` (those a method changed), by name.
fn compressed_layers(doc: &Value) -> Vec<&Value> {
    // report.json holds the core's report under `report`, beside the summary.
    let report = doc.get("report").unwrap_or(doc);
    report["tensors"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|t| t["methods"].as_array().is_some_and(|m| !m.is_empty()))
                .collect()
        })
        .unwrap_or_default()
}

fn names(layers: &[&Value]) -> Vec<String> {
    layers
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Bits per weight and sparsity per compressed layer.
pub fn layers_chart(report: &Value) -> String {
    let layers = compressed_layers(report);
    let labels = names(&layers);
    hbars(
        "Bits per weight and sparsity per layer",
        &labels,
        &[
            Series {
                name: "bits per weight",
                color: BLUE,
                values: layers.iter().map(|t| num(&t["bits_per_weight"])).collect(),
            },
            Series {
                name: "sparsity",
                color: ORANGE,
                values: layers.iter().map(|t| num(&t["sparsity"])).collect(),
            },
        ],
    )
}

/// Relative L2 error of each compressed layer's weights.
pub fn error_chart(report: &Value) -> String {
    let layers = compressed_layers(report);
    let labels = names(&layers);
    hbars(
        "Weight error per layer (relative L2)",
        &labels,
        &[Series {
            name: "relative L2 error",
            color: RED,
            values: layers
                .iter()
                .map(|t| num(&t["relative_l2_error"]))
                .collect(),
        }],
    )
}

/// A search's candidates, ratio against metric, from `search.json`.
pub fn frontier_chart(search: &Value) -> String {
    let chosen = search["chosen"].as_u64().map(|c| c as usize);
    let points: Vec<Point> = search["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .enumerate()
                .map(|(i, c)| Point {
                    x: num(&c["ratio"]),
                    y: num(&c["metric"]),
                    name: c["name"].as_str().unwrap_or("?").to_string(),
                    meets: c["meets"].as_bool().unwrap_or(false),
                    frontier: c["frontier"].as_bool().unwrap_or(false),
                    chosen: chosen == Some(i),
                })
                .collect()
        })
        .unwrap_or_default();
    let metric = search["metric"].as_str().unwrap_or("metric");
    scatter(
        "Search: compression ratio against metric",
        "ratio (original bytes / model.onnx bytes)",
        metric,
        &points,
    )
}

/// Training loss and validation metric per epoch, from `training.json`.
pub fn training_chart(training: &Value) -> String {
    let epochs = training["epochs"].as_array().cloned().unwrap_or_default();
    let xs: Vec<f64> = epochs.iter().map(|e| num(&e["epoch"])).collect();
    let col = |k: &str| epochs.iter().map(|e| num(&e[k])).collect::<Vec<_>>();
    lines(
        "Training: loss and validation metric per epoch",
        "epoch",
        "value",
        &xs,
        &[
            Series {
                name: "training loss",
                color: ORANGE,
                values: col("train_loss"),
            },
            Series {
                name: "validation loss",
                color: RED,
                values: col("validation_loss"),
            },
            Series {
                name: "validation metric",
                color: BLUE,
                values: col("validation_metric"),
            },
        ],
    )
}

/// Draws a chart from the JSON document of an artifact.
pub type Draw = fn(&Value) -> String;

/// A chart by name, from the artifact it is drawn from: (artifact, draw).
pub fn chart_source(name: &str) -> Option<(&'static str, Draw)> {
    Some(match name {
        "layers" => ("report.json", layers_chart as Draw),
        "error" => ("report.json", error_chart),
        "frontier" => ("search.json", frontier_chart),
        "training" => ("training.json", training_chart),
        _ => return None,
    })
}

/// Every chart name, for the API's error message and the page.
pub const CHART_NAMES: &[&str] = &["layers", "error", "frontier", "training"];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_are_escaped() {
        let svg = hbars(
            "t<&>",
            &["<script>alert(1)</script>".into()],
            &[Series {
                name: "a\"b",
                color: BLUE,
                values: vec![1.0],
            }],
        );
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("t&lt;&amp;&gt;"));
        assert!(svg.contains("a&quot;b"));
    }

    #[test]
    fn bars_scale_to_the_series_maximum() {
        let svg = hbars(
            "t",
            &["a".into(), "b".into()],
            &[Series {
                name: "s",
                color: BLUE,
                values: vec![2.0, 4.0],
            }],
        );
        assert!(svg.contains("width=\"320.0\""), "{svg}");
        assert!(svg.contains("width=\"640.0\""), "{svg}");
    }

    #[test]
    fn frontier_marks_the_chosen_candidate() {
        let doc = json!({"metric": "top1", "chosen": 1, "candidates": [
            {"name": "int8-all", "ratio": 3.0, "metric": 0.98, "meets": true, "frontier": true},
            {"name": "mixed", "ratio": 5.0, "metric": 0.97, "meets": true, "frontier": true},
            {"name": "int4-all", "ratio": 6.0, "metric": 0.5, "meets": false, "frontier": true},
        ]});
        let svg = frontier_chart(&doc);
        assert_eq!(svg.matches("class=\"chosen\"").count(), 1);
        assert!(svg.contains("chosen: mixed"));
        assert_eq!(svg.matches("<circle").count(), 4);
    }

    #[test]
    fn training_draws_one_line_per_series() {
        let doc = json!({"epochs": [
            {"epoch": 1, "train_loss": 0.5, "validation_loss": 0.6, "validation_metric": 0.9},
            {"epoch": 2, "train_loss": 0.3, "validation_loss": 0.4, "validation_metric": 0.95},
        ]});
        let svg = training_chart(&doc);
        assert_eq!(svg.matches("<polyline").count(), 3);
    }

    #[test]
    fn empty_inputs_still_draw() {
        assert!(frontier_chart(&json!({})).ends_with("</svg>"));
        assert!(training_chart(&json!({})).ends_with("</svg>"));
        assert!(layers_chart(&json!({})).ends_with("</svg>"));
    }

    #[test]
    fn layers_come_from_the_report_inside_report_json() {
        let doc = json!({"summary": {}, "report": {"tensors": [
            {"name": "conv", "methods": ["quantize(int8)"], "bits_per_weight": 8.1, "sparsity": 0.0, "relative_l2_error": 0.01},
            {"name": "bias", "methods": [], "bits_per_weight": 32.0, "sparsity": 0.0, "relative_l2_error": 0.0},
        ]}});
        let svg = layers_chart(&doc);
        assert!(svg.contains(">conv<"));
        assert!(!svg.contains(">bias<"));
        assert!(error_chart(&doc).contains(">conv<"));
    }
}
