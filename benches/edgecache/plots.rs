//! PNG plots of one benchmark run, drawn from the same samples as the table
//! (and the CSV files next to them).
//!
//! plotters draws into an RGB buffer (no system font lookup, no image
//! crate: `ab_glyph` renders the text from one TTF file, `png` encodes).
//! The font is DejaVu Sans from Debian's fonts-dejavu-core, which
//! `tests/services.sh deps` installs; EDGECACHE_BENCH_FONT names another
//! TTF file.

use plotters::coord::Shift;
use plotters::prelude::*;
use std::error::Error;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Run colours, then fixed colours for goals and references.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];
const GOAL: RGBColor = RGBColor(214, 39, 40);
const REFERENCE: RGBColor = RGBColor(127, 127, 127);

/// Loads the font once; plotters' ab_glyph backend wants `'static` bytes,
/// so they are leaked (a few hundred KiB, once per process).
pub fn register_font() -> Result<()> {
    let path = std::env::var_os("EDGECACHE_BENCH_FONT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FONT));
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "plot font {}: {e} (install fonts-dejavu-core: `bash tests/services.sh deps`, \
             or set EDGECACHE_BENCH_FONT to a TTF file)",
            path.display()
        )
    })?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
        .map_err(|_| format!("{} is not a TTF/OTF font", path.display()))?;
    Ok(())
}

/// Draws into an RGB buffer with `draw`, then writes it as a PNG.
fn render(path: &Path, draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&buffer)?;
    Ok(())
}

fn caption_style() -> TextStyle<'static> {
    ("sans-serif", 22).into_font().into()
}

/// One labelled line of (x, y) points.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// RSS over time for each rehydrate run, with the memory budget and the
/// goal as horizontal lines.
pub fn rss(path: &Path, runs: &[Line], budget_mib: f64, goal_mib: f64, title: &str) -> Result<()> {
    let max_x = runs
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let max_y = runs
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.1))
        .fold(budget_mib.max(goal_mib), f64::max)
        * 1.1;
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, caption_style())
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_x * 1.02, 0.0..max_y)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("seconds since the agent started")
            .y_desc("RSS (MiB)")
            .label_style(("sans-serif", 15))
            .draw()?;
        for (i, run) in runs.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    run.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(run.label.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        for (value, label, color) in [
            (
                budget_mib,
                format!("memory budget {budget_mib:.0} MiB"),
                REFERENCE,
            ),
            (
                goal_mib,
                format!("goal: peak RSS ≤ {goal_mib:.0} MiB"),
                GOAL,
            ),
        ] {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, value), (max_x * 1.02, value)],
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

/// Latency distributions as "share of requests slower than x" on log-log
/// axes, so the tail (p99, p99.9) is as readable as the median. Latencies
/// in µs; plotted in ms. `goals_ms` are drawn as vertical lines.
pub fn latency(
    path: &Path,
    series: &[(String, Vec<i64>)],
    goals_ms: &[(f64, String)],
    title: &str,
) -> Result<()> {
    let lines: Vec<Line> = series
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(label, v)| Line {
            label: format!("{label} (n = {})", v.len()),
            points: slower_than(v),
        })
        .collect();
    let max_ms = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let min_share = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0_f64, f64::min)
        .max(1e-6);
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, caption_style())
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (0.01..max_ms * 1.5).log_scale(),
                (min_share * 0.5..1.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("latency (ms)")
            .y_desc("share of requests slower")
            .label_style(("sans-serif", 15))
            .y_label_formatter(&|v| format!("{}%", trim(v * 100.0)))
            .x_label_formatter(&|v| trim(*v))
            .draw()?;
        for (i, line) in lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(line.label.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        // p99: where each curve crosses 1 %.
        chart.draw_series(LineSeries::new(
            [(0.01, 0.01), (max_ms * 1.5, 0.01)],
            REFERENCE.stroke_width(2),
        ))?;
        for (x, label) in goals_ms {
            let x = *x;
            chart
                .draw_series(LineSeries::new(
                    [(x, min_share * 0.5), (x, 1.0)],
                    GOAL.stroke_width(2),
                ))?
                .label(label.clone())
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GOAL));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// (latency in ms, share of samples strictly slower), one point per
/// distinct latency; values below 1 µs are drawn at 1 µs (log axis).
fn slower_than(samples: &[i64]) -> Vec<(f64, f64)> {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let n = v.len() as f64;
    let mut points = Vec::new();
    for (i, &us) in v.iter().enumerate() {
        let last_of_value = v.get(i + 1) != Some(&us);
        if last_of_value && i + 1 < v.len() {
            points.push((us.max(1) as f64 / 1000.0, (v.len() - i - 1) as f64 / n));
        }
    }
    points
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// One bar per run, edgecache and the naive reference side by side, with
/// the throughput goal and "10× the naive median" as horizontal lines.
pub fn throughput(
    path: &Path,
    agent: &[f64],
    naive: &[f64],
    goal: f64,
    naive_median: f64,
    title: &str,
) -> Result<()> {
    let bars: Vec<(String, f64, RGBColor)> = agent
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("edgecache {}", i + 1), *v, PALETTE[0]))
        .chain(
            naive
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("naive {}", i + 1), *v, REFERENCE)),
        )
        .collect();
    let max_y = bars
        .iter()
        .map(|b| b.1)
        .fold(goal.max(naive_median * 10.0), f64::max)
        * 1.15
        / 1000.0;
    let n = bars.len().max(1) as f64;
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, caption_style())
            .margin(15)
            .x_label_area_size(10)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..n, 0.0..max_y)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc("thousand records/s (start → all data in Redis)")
            .label_style(("sans-serif", 15))
            .draw()?;
        for (i, (label, value, color)) in bars.iter().enumerate() {
            let x = i as f64;
            let k = value / 1000.0;
            chart.draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, k)],
                color.filled(),
            )])?;
            chart.draw_series([Text::new(
                format!("{label}: {k:.0}k/s"),
                (x + 0.15, k + max_y * 0.02),
                ("sans-serif", 14),
            )])?;
        }
        for (value, label, color) in [
            (
                goal / 1000.0,
                format!("goal {:.0}k records/s", goal / 1000.0),
                GOAL,
            ),
            (
                naive_median * 10.0 / 1000.0,
                format!("10 × naive median ({:.0}k/s)", naive_median * 10.0 / 1000.0),
                PALETTE[1],
            ),
        ] {
            if value <= 0.0 {
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    [(0.0, value), (n, value)],
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}
