//! Charts as self-contained SVG, written by hand so that no plotting crate (and no font or
//! image library) is needed: the training-loss curve (people would rather look at a curve than
//! read `trainer_state.json`) and the grouped bar chart comparing evaluated models. Any browser
//! opens an SVG.

use std::fmt::Write as _;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 58.0;

/// Round tick positions (1, 2 or 5 times a power of ten) covering `[lo, hi]`, about `target` of them.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi < lo {
        return Vec::new();
    }
    let (lo, hi) = if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A tick label without float noise (`0.30000000000000004` prints as `0.3`).
fn label(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if x.abs() >= 1e5 || x.abs() < 1e-3 {
        return format!("{x:.1e}");
    }
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The document's opening: size, white background and the title.
fn open_svg(title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    svg
}

/// The document closed with `message` in the middle instead of a plot.
fn close_empty(mut svg: String, message: &str) -> String {
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        HEIGHT / 2.0,
        escape(message)
    );
    svg.push_str("</svg>\n");
    svg
}

/// Horizontal grid lines with tick marks and labels at `ticks` (mapped to pixels by `sy`).
fn y_axis(svg: &mut String, ticks: &[f64], sy: impl Fn(f64) -> f64) {
    for &t in ticks {
        let y = sy(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}" stroke="#e5e5e5"/><line x1="{:.2}" y1="{y:.2}" x2="{LEFT}" y2="{y:.2}" stroke="black"/><text x="{:.2}" y="{:.2}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0,
            label(t)
        );
    }
}

/// The plot area's frame and the two axis titles.
fn frame(svg: &mut String, x_title: &str, y_title: &str) {
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 14.0,
        escape(x_title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.2}" text-anchor="middle" transform="rotate(-90 18 {:.2})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(y_title)
    );
}

/// Colours of the bar series (matplotlib's tab10).
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A grouped bar chart: one group per category (e.g. a task), one bar per series (e.g. a model
/// or adapter) in each group, with a legend. `values[s][c]` is series `s` in category `c`;
/// non-finite values draw no bar. The y axis starts at zero (scores and perplexities are
/// positive); each bar carries its value.
pub fn bar_chart_svg(
    title: &str,
    y_title: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    let mut svg = open_svg(title);
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let finite: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    if categories.is_empty() || finite.is_empty() {
        return close_empty(svg, "no results");
    }
    let hi = finite.iter().copied().fold(0.0, f64::max).max(1e-12);
    let yticks = nice_ticks(0.0, hi * 1.08, 5);
    let y_hi = yticks.last().copied().unwrap_or(hi).max(hi * 1.08);
    let sy = |y: f64| TOP + ph - y / y_hi * ph;
    y_axis(&mut svg, &yticks, sy);
    let group_w = pw / categories.len() as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (c, cat) in categories.iter().enumerate() {
        let x0 = LEFT + c as f64 * group_w + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let Some(v) = values.get(c).copied().filter(|v| v.is_finite()) else {
                continue;
            };
            let x = x0 + s as f64 * bar_w;
            let y = sy(v.max(0.0));
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.2}" y="{y:.2}" width="{:.2}" height="{:.2}" fill="{}"/><text x="{:.2}" y="{:.2}" text-anchor="middle" font-size="10">{}</text>"#,
                bar_w * 0.92,
                TOP + ph - y,
                PALETTE[s % PALETTE.len()],
                x + bar_w * 0.46,
                y - 3.0,
                label((v * 1e4).round() / 1e4)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>"#,
            LEFT + (c as f64 + 0.5) * group_w,
            TOP + ph + 18.0,
            escape(cat)
        );
    }
    for (s, (name, _)) in series.iter().enumerate() {
        let y = TOP + 8.0 + s as f64 * 16.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{:.2}" y="{:.2}" width="10" height="10" fill="{}"/><text x="{:.2}" y="{:.2}" text-anchor="end" font-size="11">{}</text>"#,
            WIDTH - RIGHT - 14.0,
            y,
            PALETTE[s % PALETTE.len()],
            WIDTH - RIGHT - 18.0,
            y + 9.0,
            escape(name)
        );
    }
    frame(&mut svg, "", y_title);
    svg.push_str("</svg>\n");
    svg
}

/// An SVG document plotting `points` (step, loss) as a polyline with axes, ticks and labels.
/// Non-finite losses are skipped; with no points the plot says so.
pub fn loss_curve_svg(points: &[(u64, f64)], title: &str) -> String {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|(s, l)| (*s as f64, *l))
        .collect();
    let mut svg = open_svg(title);
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    if pts.is_empty() {
        return close_empty(svg, "no loss was logged");
    }
    let (mut x0, mut x1) = (pts[0].0, pts[0].0);
    let (mut y0, mut y1) = (pts[0].1, pts[0].1);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let xticks = nice_ticks(x0.min(0.0), x1, 6);
    let yticks = nice_ticks(y0, y1, 5);
    // Extend the ranges to the outermost ticks so the curve never touches the frame.
    let x_lo = xticks.first().copied().unwrap_or(x0).min(x0);
    let x_hi = (xticks.last().copied().unwrap_or(x1).max(x1)).max(x_lo + 1.0);
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let y_lo = yticks.first().copied().unwrap_or(y0).min(y0 - pad);
    let y_hi = yticks.last().copied().unwrap_or(y1).max(y1 + pad);
    let sx = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * pw;
    let sy = |y: f64| TOP + ph - (y - y_lo) / (y_hi - y_lo) * ph;

    y_axis(&mut svg, &yticks, sy);
    for &t in &xticks {
        let x = sx(t);
        let yb = TOP + ph;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.2}" y1="{yb:.2}" x2="{x:.2}" y2="{:.2}" stroke="black"/><text x="{x:.2}" y="{:.2}" text-anchor="middle">{}</text>"##,
            yb + 5.0,
            yb + 19.0,
            label(t)
        );
    }
    frame(&mut svg, "step", "training loss");
    let coords: Vec<String> = pts
        .iter()
        .map(|&(x, y)| format!("{:.2},{:.2}", sx(x), sy(y)))
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.8" points="{}"/>"##,
        coords.join(" ")
    );
    if pts.len() == 1 {
        let (x, y) = pts[0];
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.2}" cy="{:.2}" r="3" fill="#1f77b4"/>"##,
            sx(x),
            sy(y)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(1.23, 1.87, 5);
        assert!(
            t.len() >= 3
                && t.iter()
                    .all(|x| (x * 10.0 - (x * 10.0).round()).abs() < 1e-9),
            "{t:?}"
        );
        assert!(!nice_ticks(3.0, 3.0, 5).is_empty());
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
    }

    #[test]
    fn svg_has_axes_labels_and_curve() {
        let pts: Vec<(u64, f64)> = (1..=20).map(|s| (s, 3.0 / s as f64 + 0.5)).collect();
        let svg = loss_curve_svg(&pts, "loss <FT>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(
            svg.contains("<polyline") && svg.contains(">step<") && svg.contains("training loss")
        );
        assert!(svg.contains("loss &lt;FT&gt;"));
        let n = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .split(' ')
            .count();
        assert_eq!(n, 20);
        let empty = loss_curve_svg(&[], "x");
        assert!(empty.contains("no loss was logged"));
        assert!(loss_curve_svg(&[(1, 2.0)], "one").contains("<circle"));
    }

    #[test]
    fn bar_chart_has_one_bar_per_finite_value_and_a_legend() {
        let cats = vec!["nqopen".to_string(), "gsm8k".to_string()];
        let series = vec![
            ("base".to_string(), vec![0.25, 0.1]),
            ("corda <ft>".to_string(), vec![0.2, f64::NAN]),
        ];
        let svg = bar_chart_svg("accuracy", "exact match", &cats, &series);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Background, frame, the legend's two swatches and three bars.
        assert_eq!(svg.matches("<rect").count(), 1 + 1 + 2 + 3, "{svg}");
        assert!(
            svg.contains("corda &lt;ft&gt;") && svg.contains(">gsm8k<") && svg.contains(">0.25<")
        );
        assert!(bar_chart_svg("x", "y", &cats, &[]).contains("no results"));
    }
}
