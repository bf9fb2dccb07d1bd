//! The report's plots: drawn with plotters as SVG, rasterised to PNG with resvg (text in a system font).

use std::path::Path;

use plotters::prelude::*;

use super::results::Results;
use super::systems::System;

type Fallible = Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes `ttft_vs_context.png`, `throughput_vs_concurrency.png` and `bytes_per_codec.png` into `dir`.
pub fn write_all(r: &Results, dir: &Path) -> Fallible {
    let fonts = fonts()?;
    save(
        &fonts,
        &ttft_vs_context(r)?,
        &dir.join("ttft_vs_context.png"),
    )?;
    save(
        &fonts,
        &throughput(r)?,
        &dir.join("throughput_vs_concurrency.png"),
    )?;
    save(
        &fonts,
        &bytes_per_codec(r)?,
        &dir.join("bytes_per_codec.png"),
    )
}

const SIZE: (u32, u32) = (1000, 700);
const SYSTEMS: [System; 5] = System::ALL;

fn color(i: usize) -> RGBColor {
    [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
    ][i % 5]
}

/// Time to first token against context length, one panel per link, one line per system (log-log).
fn ttft_vs_context(r: &Results) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (lo, hi) = bounds(r.single.iter().filter(|s| s.ok()).map(|s| s.ttft_s));
        let (cmin, cmax) = (
            r.context_lengths[0] as f64 / 1.5,
            *r.context_lengths.last().unwrap() as f64 * 1.5,
        );
        for (area, p) in root.split_evenly((2, 2)).iter().zip(&r.profiles) {
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("TTFT, {}", super::report::heading(r, p)),
                    ("sans-serif", 16),
                )
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(48)
                .build_cartesian_2d((cmin..cmax).log_scale(), (lo..hi).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .x_desc("shared context, tokens")
                .y_desc("TTFT, s")
                .x_labels(30)
                .y_labels(30)
                .x_label_formatter(&sparse)
                .y_label_formatter(&sparse)
                .draw()
                .map_err(err)?;
            let lines = |sys: System| {
                r.context_lengths
                    .iter()
                    .map(|&c| (c as f64, r.median(sys, p.name, c, |s| s.ttft_s)))
                    .filter(|(_, y)| y.is_finite())
                    .collect()
            };
            draw_lines(&mut chart, lines, 3, 11)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Completed requests per second against concurrent users, per system (log-log).
fn throughput(r: &Results) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let users: Vec<usize> = {
            let mut u: Vec<usize> = r.concurrency.iter().map(|c| c.users).collect();
            u.sort();
            u.dedup();
            u
        };
        let (lo, hi) = bounds(r.concurrency.iter().map(|c| c.rps()));
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Requests/s vs concurrent edges ({}, {}-token context, {} cores)",
                    r.concurrency_link, r.concurrency_context, r.machine.cores
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (0.8f64..users.last().copied().unwrap_or(1) as f64 * 1.3).log_scale(),
                (lo..hi).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("concurrent edges")
            .y_desc("completed requests / s")
            .x_labels(30)
            .y_labels(30)
            .x_label_formatter(&sparse)
            .y_label_formatter(&sparse)
            .draw()
            .map_err(err)?;
        let lines = |sys: System| {
            users
                .iter()
                .filter_map(|&u| r.run(sys, u).map(|c| (u as f64, c.rps())))
                .collect()
        };
        draw_lines(&mut chart, lines, 4, 14)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Context KV bytes per token on the wire for each codec (the largest context), with fp16 for scale.
fn bytes_per_codec(r: &Results) -> Result<String, String> {
    let ctx = r.codecs.iter().map(|c| c.context_tokens).max().unwrap_or(0);
    let rows: Vec<(String, f64)> = r
        .codecs
        .iter()
        .filter(|c| c.context_tokens == ctx)
        .map(|c| (c.codec.clone(), c.bytes as f64 / ctx as f64))
        .chain(r.codecs.iter().find(|c| c.context_tokens == ctx).map(|c| {
            (
                "fp16 (reference)".to_string(),
                c.fp16_bytes as f64 / ctx as f64,
            )
        }))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let top = rows.iter().map(|r| r.1).fold(1.0, f64::max) * 1.15;
        let n = rows.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Context KV on the wire, bytes per token ({}, {ctx}-token context)",
                    r.model
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((0..n).into_segmented(), 0f64..top)
            .map_err(err)?;
        let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("bytes per context token")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    labels.get(*i).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .draw()
            .map_err(err)?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    if i + 1 == n {
                        RGBColor(150, 150, 150).filled()
                    } else {
                        color(i).mix(0.8).filled()
                    },
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(err)?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    format!("{v:.0}"),
                    (SegmentValue::CenterOf(i), *v + top * 0.02),
                    ("sans-serif", 14),
                )
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

type LogLog<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<LogCoord<f64>, LogCoord<f64>>>;

/// One line with dots per system (`points(system)`; systems without points are left out), and the legend.
fn draw_lines<'a, 'b: 'a>(
    chart: &mut LogLog<'a, 'b>,
    points: impl Fn(System) -> Vec<(f64, f64)>,
    dot: u32,
    legend_font: u32,
) -> Fallible {
    for (i, sys) in SYSTEMS.iter().enumerate() {
        let points = points(*sys);
        if points.is_empty() {
            continue;
        }
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(sys.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, dot, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", legend_font))
        .draw()
        .map_err(err)
}

/// A log axis's tick label, only at 1, 2 and 5 × 10^k (the others crowd).
fn sparse(x: &f64) -> String {
    let lead = x / 10f64.powf(x.log10().floor());
    if [1.0, 2.0, 5.0].iter().any(|d| (lead - d).abs() < 0.01) {
        let digits = (-x.log10().floor()).max(0.0) as usize;
        format!("{x:.digits$}")
    } else {
        String::new()
    }
}

/// A log axis range around `values` (positive only).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        (0.01, 1.0)
    } else {
        (lo / 2.0, hi * 2.0)
    }
}

/// The system's fonts, with a sans-serif face for the plots' text; an error naming what to install if none.
fn fonts() -> Result<resvg::usvg::Options<'static>, String> {
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    let family = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .find(|n| n.contains("Sans") && !n.contains("Mono"))
        .ok_or("no sans-serif system font for the plots' text (install fonts-dejavu-core)")?;
    db.set_sans_serif_family(family);
    Ok(opt)
}

fn save(opt: &resvg::usvg::Options, svg: &str, path: &Path) -> Fallible {
    let tree = resvg::usvg::Tree::from_str(svg, opt).map_err(|e| format!("plot SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("empty plot")?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .save_png(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}
