//! A small hand-written SVG of cost–quality curves: log-cost x axis, quality y axis, lines for
//! the swept policies, labelled dots for single models, a star for the oracle, a dashed target.
#![forbid(unsafe_code)]
use std::fmt::Write;

pub struct Line<'a> {
    pub label: &'a str,
    pub colour: &'a str,
    /// (cost, quality), drawn in the order given.
    pub points: Vec<(f64, f64)>,
}

pub struct Dot<'a> {
    pub label: &'a str,
    pub cost: f64,
    pub quality: f64,
}

pub struct Figure<'a> {
    pub title: &'a str,
    pub lines: Vec<Line<'a>>,
    pub models: Vec<Dot<'a>>,
    pub oracle: Option<(f64, f64)>,
    /// Horizontal reference (e.g. 98% of the best model's quality) and its label.
    pub target: Option<(f64, &'a str)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Ticks for a log axis over [lo, hi] (decades, with 2 and 5 when the range is narrow).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let mults: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let mut t = Vec::new();
    for e in a..=b {
        for m in mults {
            let v = m * 10f64.powi(e);
            if v >= lo * 0.999 && v <= hi * 1.001 {
                t.push(v);
            }
        }
    }
    t
}

pub fn svg(f: &Figure<'_>) -> String {
    let (w, h) = (820.0, 560.0);
    let (l, r, t, b) = (80.0, 230.0, 50.0, 60.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let all = f
        .lines
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(f.models.iter().map(|d| (d.cost, d.quality)))
        .chain(f.oracle)
        .filter(|p| p.0 > 0.0 && p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (c, q) in all {
        x0 = x0.min(c);
        x1 = x1.max(c);
        y0 = y0.min(q);
        y1 = y1.max(q);
    }
    if let Some((q, _)) = f.target {
        y0 = y0.min(q);
        y1 = y1.max(q);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (1e-5, 1e-3, 0.0, 1.0);
    }
    // Some margin; log x needs a non-degenerate positive range.
    let (lx0, lx1) = {
        let (a, b) = (x0.log10(), x1.log10().max(x0.log10() + 0.3));
        let m = (b - a) * 0.05;
        (a - m, b + m)
    };
    let (y0, y1) = {
        let m = ((y1 - y0) * 0.08).max(0.02);
        ((y0 - m).max(0.0), (y1 + m).min(1.0))
    };
    let sx = |c: f64| l + (c.max(1e-300).log10() - lx0) / (lx1 - lx0) * pw;
    let sy = |q: f64| t + (1.0 - (q - y0) / (y1 - y0)) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        l + pw / 2.0,
        esc(f.title)
    );
    // Grid and ticks.
    for v in log_ticks(10f64.powf(lx0), 10f64.powf(lx1)) {
        let x = sx(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{v:.0e}</text>"##,
            t + ph,
            t + ph + 18.0
        );
    }
    let step = if y1 - y0 > 0.5 {
        0.1
    } else if y1 - y0 > 0.2 {
        0.05
    } else {
        0.02
    };
    let mut q = (y0 / step).ceil() * step;
    while q <= y1 + 1e-9 {
        let y = sy(q);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{q:.2}</text>"##,
            l + pw,
            l - 6.0,
            y + 4.0
        );
        q += step;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">mean cost per prompt, USD (log scale)</text>"#,
        l + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">mean score (quality)</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    if let Some((q, label)) = f.target {
        let y = sy(q);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##,
            l + pw,
            l + 6.0,
            y - 5.0,
            esc(label)
        );
    }
    for line in &f.lines {
        let pts: Vec<String> = line
            .points
            .iter()
            .filter(|p| p.0 > 0.0 && p.0.is_finite())
            .map(|&(c, q)| format!("{:.1},{:.1}", sx(c), sy(q)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"/>"#,
            pts.join(" "),
            line.colour
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                r#"<circle cx="{x}" cy="{y}" r="1.8" fill="{}"/>"#,
                line.colour
            );
        }
    }
    for d in &f.models {
        let (x, y) = (sx(d.cost), sy(d.quality));
        // Labels of dots near the right edge go to their left, clear of the legend.
        let (tx, anchor) = if x > l + 0.7 * pw {
            (x - 7.0, "end")
        } else {
            (x + 7.0, "start")
        };
        let _ = writeln!(
            s,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="black"/><text x="{tx:.1}" y="{:.1}" font-size="11" text-anchor="{anchor}">{}</text>"#,
            y - 6.0,
            esc(d.label)
        );
    }
    if let Some((c, q)) = f.oracle {
        let (x, y) = (sx(c), sy(q));
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" font-size="20" text-anchor="middle" fill="crimson">★</text>"#,
            y + 7.0
        );
    }
    // Legend, right of the plot.
    let lx = l + pw + 20.0;
    let mut ly = t + 10.0;
    for line in &f.lines {
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            line.colour,
            lx + 30.0,
            ly + 4.0,
            esc(line.label)
        );
        ly += 22.0;
    }
    let _ = writeln!(
        s,
        r#"<circle cx="{:.1}" cy="{ly}" r="5" fill="black"/><text x="{:.1}" y="{:.1}">single model</text>"#,
        lx + 12.0,
        lx + 30.0,
        ly + 4.0
    );
    ly += 22.0;
    if f.oracle.is_some() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="20" text-anchor="middle" fill="crimson">★</text><text x="{:.1}" y="{:.1}">oracle (cheapest passing)</text>"#,
            lx + 12.0,
            ly + 7.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_and_escapes_labels() {
        let f = Figure {
            title: "a <b> & c",
            lines: vec![Line {
                label: "route",
                colour: "#1f77b4",
                points: vec![(1e-5, 0.4), (1e-4, 0.6), (1e-3, 0.7)],
            }],
            models: vec![Dot {
                label: "m1",
                cost: 2e-5,
                quality: 0.5,
            }],
            oracle: Some((3e-5, 0.9)),
            target: Some((0.68, "98% of best")),
        };
        let s = svg(&f);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a &lt;b&gt; &amp; c"));
        assert!(s.contains("<polyline") && s.contains(">m1<") && s.contains("★"));
        assert!(s.contains("98% of best"));
        assert_eq!(log_ticks(1e-5, 1e-3).first(), Some(&1e-5));
    }
}
