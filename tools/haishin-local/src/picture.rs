//! A run in one picture (SVG): the ESP's upload and send slots busy over time by class, with the
//! limit drawn as a line, and the distribution of realtime latency (a CDF).
//!
//! Written as plain SVG text rather than with a plotting crate: the charts are two stacked areas
//! and a step line, which take a few hundred lines with no dependency, where a plotting crate
//! brings a font stack and a build several times that of this crate, and its SVG is no easier
//! to read or compare between runs.

use std::fmt::Write as _;

use crate::report::Report;
use crate::targets::Target;

/// Which traffic a call carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Batch,
    Realtime,
}

/// One ESP call's hold on a slot, in unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start_ms: f64,
    pub end_ms: f64,
    pub class: Class,
}

/// What the picture draws, taken from the simulator's ledger when the report is built.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// The picture's time axis, in unix milliseconds: from the first arrival to the last call's end.
    pub start_ms: f64,
    pub end_ms: f64,
    pub upload_limit: u32,
    pub send_limit: u32,
    pub upload: Vec<Span>,
    pub send: Vec<Span>,
    /// Realtime latencies (publication, or arrival when requests wait to be admitted, to the
    /// ESP accepting the send), in milliseconds, sorted.
    pub realtime_latencies_ms: Vec<f64>,
}

/// Slots busy per class, averaged over `bins` equal stretches of `[start_ms, end_ms)`: each
/// bin holds the slot-milliseconds of the spans over it divided by its width, so that the area
/// under the curve is the busy slot-time.
pub fn busy_by_class(spans: &[Span], start_ms: f64, end_ms: f64, bins: usize) -> Vec<(f64, f64)> {
    let mut out = vec![(0.0, 0.0); bins];
    let width = (end_ms - start_ms) / bins.max(1) as f64;
    if bins == 0 || width <= 0.0 {
        return out;
    }
    for span in spans {
        let (from, to) = (span.start_ms.max(start_ms), span.end_ms.min(end_ms));
        if to <= from {
            continue;
        }
        let first = ((from - start_ms) / width).floor() as usize;
        let last = (((to - start_ms) / width).ceil() as usize).min(bins);
        for (i, bin) in out.iter_mut().enumerate().take(last).skip(first) {
            let (lo, hi) = (start_ms + i as f64 * width, start_ms + (i + 1) as f64 * width);
            let share = (to.min(hi) - from.max(lo)).max(0.0) / width;
            match span.class {
                Class::Batch => bin.0 += share,
                Class::Realtime => bin.1 += share,
            }
        }
    }
    out
}

/// Tick positions for an axis from 0 to `max`: steps of 1, 2 or 5 times a power of ten, about
/// five of them.
pub fn ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0];
    }
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|s| *s >= rough).unwrap_or(10.0 * power);
    (0..).map(|i| i as f64 * step).take_while(|t| *t <= max * 1.000_001).collect()
}

const WIDTH: f64 = 960.0;
const PANEL: f64 = 210.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 96.0;
const GAP: f64 = 64.0;
const BINS: usize = 480;
const BATCH_COLOUR: &str = "#4c78a8";
const REALTIME_COLOUR: &str = "#f58518";
const LIMIT_COLOUR: &str = "#d62728";

/// The report's picture.
pub fn svg(report: &Report) -> String {
    let a = &report.activity;
    let height = TOP + 3.0 * PANEL + 3.0 * GAP;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let missed = report.targets.iter().filter(|t| !t.met).count();
    let verdict = match (report.targets.len(), missed) {
        (0, _) => String::new(),
        (n, 0) => format!(" · targets {n}/{n} met"),
        (n, m) => format!(" · targets {}/{n} met, {m} MISSED", n - m),
    };
    let title = format!("{}: {} recipients delivered", report.scenario, report.recipients.delivered);
    text(&mut out, LEFT, 24.0, "start", 16.0, &title);
    let figures = format!(
        "upload utilisation {:.3} · realtime p99 {:.0} ms · makespan {:.1} s{verdict}",
        report.esp.upload_utilization, report.realtime_latency_ms.p99, report.makespan_s
    );
    text(&mut out, LEFT, 44.0, "start", 12.0, &figures);
    legend(&mut out, 66.0);
    let seconds = ((a.end_ms - a.start_ms) / 1000.0).max(0.0);
    let mut y = TOP;
    for (name, spans, limit) in [("upload", &a.upload, a.upload_limit), ("send", &a.send, a.send_limit)] {
        busy_panel(&mut out, y, name, spans, limit, a.start_ms, a.end_ms, seconds);
        y += PANEL + GAP;
    }
    let target = report.targets.iter().find(|t| t.name == "realtime_latency_ms.p99");
    latency_panel(&mut out, y, &a.realtime_latencies_ms, target);
    out.push_str("</svg>\n");
    out
}

fn legend(out: &mut String, y: f64) {
    let mut x = LEFT;
    for (label, colour) in [("batch", BATCH_COLOUR), ("realtime", REALTIME_COLOUR)] {
        let _ = writeln!(out, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{colour}"/>"#, y - 10.0);
        text(out, x + 16.0, y, "start", 12.0, label);
        x += 90.0;
    }
    let _ = writeln!(
        out,
        r#"<line x1="{x}" y1="{y0}" x2="{}" y2="{y0}" stroke="{LIMIT_COLOUR}" stroke-width="2" stroke-dasharray="6 3"/>"#,
        x + 24.0,
        y0 = y - 4.0
    );
    text(out, x + 30.0, y, "start", 12.0, "the ESP's limit");
}

#[allow(clippy::too_many_arguments)]
fn busy_panel(
    out: &mut String,
    top: f64,
    name: &str,
    spans: &[Span],
    limit: u32,
    start_ms: f64,
    end_ms: f64,
    seconds: f64,
) {
    let bins = busy_by_class(spans, start_ms, end_ms, BINS);
    let peak = bins.iter().map(|(b, r)| b + r).fold(0.0, f64::max);
    let y_max = (f64::from(limit) + 1.0).max(peak.ceil());
    let plot_w = WIDTH - LEFT - RIGHT;
    let sx = |s: f64| LEFT + if seconds > 0.0 { s / seconds * plot_w } else { 0.0 };
    let sy = |v: f64| top + PANEL - v / y_max * PANEL;
    axes(out, top, &ticks(seconds), sx, &ticks(y_max), sy, "s", &format!("{name} slots busy"));
    // Batch from zero, realtime stacked on it: the top of the stack is all slots busy.
    let x_of = |i: usize| sx(i as f64 * seconds / BINS as f64);
    let mut batch = format!("M{:.1},{:.1}", x_of(0), sy(0.0));
    let mut total = String::new();
    for (i, (b, _)) in bins.iter().enumerate() {
        let _ = write!(batch, " L{:.1},{:.1} L{:.1},{:.1}", x_of(i), sy(*b), x_of(i + 1), sy(*b));
    }
    let _ = write!(batch, " L{:.1},{:.1} Z", x_of(bins.len()), sy(0.0));
    for (i, (b, r)) in bins.iter().enumerate() {
        let _ = write!(total, " L{:.1},{:.1} L{:.1},{:.1}", x_of(i), sy(b + r), x_of(i + 1), sy(b + r));
    }
    let mut back = String::new();
    for (i, (b, _)) in bins.iter().enumerate().rev() {
        let _ = write!(back, " L{:.1},{:.1} L{:.1},{:.1}", x_of(i + 1), sy(*b), x_of(i), sy(*b));
    }
    let realtime = format!("M{}{back} Z", total.trim_start().trim_start_matches('L'));
    let _ = writeln!(out, r#"<path d="{batch}" fill="{BATCH_COLOUR}" stroke="none"/>"#);
    if bins.iter().any(|(_, r)| *r > 0.0) {
        let _ = writeln!(out, r#"<path d="{realtime}" fill="{REALTIME_COLOUR}" stroke="none"/>"#);
    }
    let _ = writeln!(
        out,
        r#"<line class="limit" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{LIMIT_COLOUR}" stroke-width="2" stroke-dasharray="6 3"/>"#,
        WIDTH - RIGHT,
        y = sy(f64::from(limit))
    );
    text(out, WIDTH - RIGHT, sy(f64::from(limit)) - 4.0, "end", 11.0, &format!("limit {limit}"));
}

fn latency_panel(out: &mut String, top: f64, sorted: &[f64], target: Option<&Target>) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let largest = sorted.last().copied().unwrap_or(0.0);
    let x_max = largest.max(target.map_or(0.0, |t| t.target)).max(1.0) * 1.05;
    let sx = |ms: f64| LEFT + ms / x_max * plot_w;
    let sy = |share: f64| top + PANEL - share * PANEL;
    let shares = [0.0, 0.25, 0.5, 0.75, 1.0];
    axes(out, top, &ticks(x_max), sx, &shares, sy, "ms", "realtime events (CDF)");
    if sorted.is_empty() {
        text(out, LEFT + plot_w / 2.0, top + PANEL / 2.0, "middle", 14.0, "no realtime latency measured");
        return;
    }
    let n = sorted.len() as f64;
    let mut d = format!("M{:.1},{:.1}", sx(0.0), sy(0.0));
    for (i, ms) in sorted.iter().enumerate() {
        let _ = write!(
            d,
            " L{:.1},{:.1} L{:.1},{:.1}",
            sx(*ms),
            sy(i as f64 / n),
            sx(*ms),
            sy((i + 1) as f64 / n)
        );
    }
    let _ = writeln!(out, r#"<path d="{d}" fill="none" stroke="{REALTIME_COLOUR}" stroke-width="2"/>"#);
    if let Some(t) = target {
        let x = sx(t.target);
        let _ = writeln!(
            out,
            r#"<line class="target" x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="{LIMIT_COLOUR}" stroke-width="2" stroke-dasharray="6 3"/>"#,
            top + PANEL
        );
        let mark = if t.met { "met" } else { "MISSED" };
        let (lx, anchor) = if x + 180.0 > WIDTH - RIGHT { (x - 4.0, "end") } else { (x + 4.0, "start") };
        text(out, lx, top + 14.0, anchor, 11.0, &format!("p99 target {:.0} ms ({mark})", t.target));
    }
    for (p, label) in [(0.5, "p50"), (0.99, "p99")] {
        let rank = ((p * n).ceil() as usize).clamp(1, sorted.len());
        let ms = sorted[rank - 1];
        let _ = writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="black"/>"#, sx(ms), sy(p));
        // Left of the point when the label would run past the frame.
        let (x, anchor) =
            if sx(ms) + 90.0 > WIDTH - RIGHT { (sx(ms) - 6.0, "end") } else { (sx(ms) + 6.0, "start") };
        text(out, x, sy(p) + 14.0, anchor, 11.0, &format!("{label} {ms:.0} ms"));
    }
}

/// The frame, grid lines and tick labels of a panel.
#[allow(clippy::too_many_arguments)]
fn axes(
    out: &mut String,
    top: f64,
    x_ticks: &[f64],
    sx: impl Fn(f64) -> f64,
    y_ticks: &[f64],
    sy: impl Fn(f64) -> f64,
    x_unit: &str,
    title: &str,
) {
    let (right, bottom) = (WIDTH - RIGHT, top + PANEL);
    for t in y_ticks {
        let y = sy(*t);
        let _ =
            writeln!(out, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e0e0e0"/>"##);
        text(out, LEFT - 6.0, y + 4.0, "end", 11.0, &trim(*t));
    }
    for t in x_ticks {
        let x = sx(*t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#444"/>"##,
            bottom + 4.0
        );
        text(out, x, bottom + 17.0, "middle", 11.0, &trim(*t));
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{PANEL}" fill="none" stroke="#444"/>"##,
        right - LEFT
    );
    text(out, right, bottom + 32.0, "end", 11.0, x_unit);
    text(out, LEFT, top - 6.0, "start", 13.0, title);
}

fn trim(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, size: f64, content: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{}</text>"#,
        escape(content)
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Where a report's picture goes beside its JSON: `bench.json` and scenario `steady` give
/// `bench.steady.svg`; `demo.report.json` alone gives `demo.report.svg`.
pub fn path_beside(json: &std::path::Path, scenario: Option<&str>) -> std::path::PathBuf {
    let stem = json.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "report".into());
    let name = match scenario {
        Some(scenario) => format!("{stem}.{scenario}.svg"),
        None => format!("{stem}.svg"),
    };
    json.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start_ms: f64, end_ms: f64, class: Class) -> Span {
        Span { start_ms, end_ms, class }
    }

    #[test]
    fn busy_slots_are_averaged_per_bin_by_class() {
        // Bins of 100 ms over 0..400: a batch call over 50..250, a realtime call over 100..200,
        // a batch call that starts before the window and one after it.
        let spans = [
            span(50.0, 250.0, Class::Batch),
            span(100.0, 200.0, Class::Realtime),
            span(-100.0, 100.0, Class::Batch),
            span(500.0, 600.0, Class::Batch),
        ];
        let bins = busy_by_class(&spans, 0.0, 400.0, 4);
        assert_eq!(bins, vec![(1.5, 0.0), (1.0, 1.0), (0.5, 0.0), (0.0, 0.0)]);
        let area: f64 = bins.iter().map(|(b, r)| (b + r) * 100.0).sum();
        assert_eq!(area, 200.0 + 100.0 + 100.0, "the area is the slot-milliseconds in the window");
    }

    #[test]
    fn an_empty_window_has_no_busy_slots() {
        assert_eq!(busy_by_class(&[span(0.0, 10.0, Class::Batch)], 5.0, 5.0, 3), vec![(0.0, 0.0); 3]);
    }

    #[test]
    fn ticks_are_round_steps_up_to_the_maximum() {
        assert_eq!(ticks(9.0), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(ticks(100.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(0.3), vec![0.0, 0.1, 0.2, 0.30000000000000004]);
        assert_eq!(ticks(0.0), vec![0.0]);
    }

    #[test]
    fn pictures_go_beside_their_json() {
        use std::path::Path;
        assert_eq!(
            path_beside(Path::new("/tmp/bench.json"), Some("steady")),
            Path::new("/tmp/bench.steady.svg")
        );
        assert_eq!(path_beside(Path::new("demo.report.json"), None), Path::new("demo.report.svg"));
    }

    #[test]
    fn the_picture_draws_both_classes_the_limit_and_the_latency_target() {
        use crate::report::tests::sample_report;
        let mut report = sample_report("demo");
        report.activity = Activity {
            start_ms: 0.0,
            end_ms: 10_000.0,
            upload_limit: 4,
            send_limit: 4,
            upload: vec![span(0.0, 10_000.0, Class::Batch), span(2_000.0, 2_500.0, Class::Realtime)],
            send: vec![span(1_000.0, 1_200.0, Class::Batch)],
            realtime_latencies_ms: vec![120.0, 300.0, 800.0],
        };
        report.targets = vec![Target::at_most("realtime_latency_ms.p99", 800.0, 500.0)];
        let svg = svg(&report);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches(r#"class="limit""#).count(), 2, "one limit line per API");
        assert_eq!(
            svg.matches(&format!(r#"fill="{REALTIME_COLOUR}" stroke="none""#)).count(),
            1,
            "realtime on uploads only"
        );
        assert!(svg.contains("p99 target 500 ms (MISSED)"), "{svg}");
        assert!(svg.contains("targets 0/1 met, 1 MISSED"));
        assert!(svg.contains("p99 800 ms"));
        // The limit of 4 is drawn at 4/5 of the panel's height (the axis goes to limit + 1).
        let y = TOP + PANEL - 4.0 / 5.0 * PANEL;
        assert!(svg.contains(&format!(r#"y1="{y:.1}" x2="930.0" y2="{y:.1}""#)), "{svg}");
    }

    #[test]
    fn a_run_without_realtime_events_says_so() {
        use crate::report::tests::sample_report;
        let mut report = sample_report("steady <4>");
        report.activity.end_ms = 1_000.0;
        let svg = svg(&report);
        assert!(svg.contains("no realtime latency measured"));
        assert!(svg.contains("steady &lt;4&gt;"), "text is escaped");
    }
}
