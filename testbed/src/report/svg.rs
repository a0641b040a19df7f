//! Inline SVG charts for the HTML report: line charts over the run's time axis with the
//! faults marked as dashed vertical lines, and a bar chart for the reconnect histogram.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::stats::{Mark, Sample};

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Escapes text for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A named line of (seconds, value) points.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Open connections per node over time.
pub fn connections_chart(series: &[Sample], marks: &[Mark]) -> String {
    let nodes: BTreeSet<&String> = series.iter().flat_map(|s| s.per_node.keys()).collect();
    let lines = nodes
        .into_iter()
        .map(|node| Line {
            name: node.clone(),
            points: series
                .iter()
                .map(|s| (s.t, s.per_node.get(node).copied().unwrap_or(0) as f64))
                .collect(),
        })
        .collect::<Vec<_>>();
    line_chart("Connections per node", &lines, marks)
}

/// Deliveries and acks per second over time.
pub fn deliveries_chart(series: &[Sample], marks: &[Mark]) -> String {
    let line = |name: &str, value: fn(&Sample) -> f64| Line {
        name: name.to_owned(),
        points: series.iter().map(|s| (s.t, value(s))).collect(),
    };
    let lines = [
        line("deliveries/s", |s| s.delivered_per_s),
        line("acks/s", |s| s.acked_per_s),
        line("reconnects/s", |s| s.reconnects_per_s),
    ];
    line_chart("Messages per second", &lines, marks)
}

fn line_chart(title: &str, lines: &[Line], marks: &[Mark]) -> String {
    let points = lines.iter().flat_map(|l| l.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| LEFT + t / x_max * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| HEIGHT - BOTTOM - v / y_max * (HEIGHT - TOP - BOTTOM);
    let mut out = open(title);
    axes(&mut out, x_max, y_max);
    for mark in marks.iter().filter(|m| !m.label.starts_with("phase ")) {
        let px = x(mark.t);
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#999\" \
             stroke-dasharray=\"4 3\"><title>{:.1} s: {}</title></line>",
            HEIGHT - BOTTOM,
            mark.t,
            escape(&mark.label)
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = line
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{:.0}\" y=\"{:.0}\" fill=\"{color}\" font-size=\"12\">{}</text>",
            path.join(" "),
            LEFT + 10.0 + 110.0 * i as f64,
            TOP - 8.0,
            escape(&line.name)
        );
    }
    out.push_str(&phase_labels(marks, x));
    out.push_str("</svg>");
    out
}

/// Phase names along the bottom of the chart.
fn phase_labels(marks: &[Mark], x: impl Fn(f64) -> f64) -> String {
    let mut out = String::new();
    for mark in marks {
        if let Some(name) = mark.label.strip_prefix("phase ") {
            let px = x(mark.t);
            let _ = write!(
                out,
                "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
                HEIGHT - BOTTOM,
                px + 3.0,
                HEIGHT - BOTTOM - 4.0,
                escape(name)
            );
        }
    }
    out
}

fn open(title: &str) -> String {
    format!(
        "<h2>{}</h2><svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\">",
        escape(title)
    )
}

fn axes(out: &mut String, x_max: f64, y_max: f64) {
    let (x0, y0) = (LEFT, HEIGHT - BOTTOM);
    let _ = write!(
        out,
        "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{:.0}\" y2=\"{y0}\" stroke=\"#000\"/>\
         <line x1=\"{x0}\" y1=\"{TOP}\" x2=\"{x0}\" y2=\"{y0}\" stroke=\"#000\"/>\
         <text x=\"{x0}\" y=\"{:.0}\" font-size=\"11\">0 s</text>\
         <text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">{x_max:.0} s</text>\
         <text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">{y_max:.0}</text>\
         <text x=\"{:.0}\" y=\"{y0}\" font-size=\"11\" text-anchor=\"end\">0</text>",
        WIDTH - RIGHT,
        y0 + 15.0,
        WIDTH - RIGHT,
        y0 + 15.0,
        x0 - 4.0,
        TOP + 4.0,
        x0 - 4.0,
    );
}

/// Bars of the reconnect histogram: (upper bound ms, count).
pub fn histogram_chart(buckets: &[(f64, u64)]) -> String {
    let mut out = open("Reconnect time (disconnect to room re-joined)");
    let max = buckets.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    axes(&mut out, 0.0, max);
    let slot = (WIDTH - LEFT - RIGHT) / buckets.len().max(1) as f64;
    let mut lower = 0.0;
    for (i, (upper, count)) in buckets.iter().enumerate() {
        let height = *count as f64 / max * (HEIGHT - TOP - BOTTOM);
        let px = LEFT + slot * i as f64;
        let label = if upper.is_finite() {
            format!("≤{}", ms_label(*upper))
        } else {
            format!(">{}", ms_label(lower))
        };
        let _ = write!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" \
             fill=\"#1f77b4\"><title>{count}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{label}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{count}</text>",
            px + 4.0,
            HEIGHT - BOTTOM - height,
            slot - 8.0,
            px + slot / 2.0,
            HEIGHT - BOTTOM + 28.0,
            px + slot / 2.0,
            HEIGHT - BOTTOM - height - 4.0,
        );
        lower = *upper;
    }
    out.push_str("</svg>");
    out
}

fn ms_label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", ms / 1000.0)
    } else {
        format!("{ms} ms")
    }
}
