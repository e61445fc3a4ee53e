//! The bench chart: throughput over time of every run, one panel per link class (1 GbE,
//! 10 GbE), with the links' measured raw rate as a dashed line.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::transports::BenchReport;

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Why a chart was not drawn.
#[derive(Clone, Debug, thiserror::Error, displaydoc::Display)]
pub enum ChartError {
    /// no TrueType font at {0:?} (scripts/setup.sh installs fonts-dejavu-core)
    NoFont(&'static [&'static str]),
    /// the system font is not a usable TrueType font
    BadFont,
    /// drawing {path}: {why}
    Draw { path: PathBuf, why: String },
}

impl ChartError {
    /// A drawing error of plotters (generic over its backend), for `path`.
    pub(crate) fn draw(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> ChartError + '_ {
        move |why| ChartError::Draw {
            path: path.to_path_buf(),
            why: why.to_string(),
        }
    }
}

/// plotters draws text with a font it is given; ours comes from the system (fonts-dejavu-core).
pub(crate) fn register_font() -> Result<(), ChartError> {
    static DONE: OnceLock<Result<(), ChartError>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONTS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or(ChartError::NoFont(&FONTS))?;
        // Registered once for the life of the process, as plotters requires 'static bytes.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| ChartError::BadFont)
    })
    .clone()
}

fn class(links: &str) -> &'static str {
    if links.starts_with("10g") {
        "10 GbE links"
    } else {
        "1 GbE link"
    }
}

pub fn draw(b: &BenchReport, path: &Path) -> Result<(), ChartError> {
    register_font()?;
    let mut classes: Vec<&'static str> = Vec::new();
    for r in &b.rows {
        let c = class(&r.links);
        if !classes.contains(&c) {
            classes.push(c);
        }
    }
    let panels = classes.len().max(1);
    let root = BitMapBackend::new(path, (1400, 520 * panels as u32)).into_drawing_area();
    let e = ChartError::draw(path);
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let areas = root.split_evenly((panels, 1));
    for (area, c) in areas.iter().zip(&classes) {
        let rows: Vec<_> = b.rows.iter().filter(|r| class(&r.links) == *c).collect();
        let t_max = rows
            .iter()
            .flat_map(|r| r.samples.last().map(|s| s.0))
            .fold(0.5f64, f64::max);
        let link_max = b
            .links
            .iter()
            .filter(|l| class(&l.links) == *c)
            .map(|l| l.measured.interface_bps / 1e9)
            .fold(0.0, f64::max);
        let y_max = rows
            .iter()
            .flat_map(|r| r.samples.iter().map(|s| s.1))
            .fold(link_max, f64::max)
            * 1.15;
        let title = format!(
            "{c}: {} MiB VM, workload {}, memory {}",
            b.memory_bytes >> 20,
            b.workload,
            b.memory_profile
        );
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..t_max * 1.02, 0f64..y_max.max(0.1))
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the migration started")
            .y_desc("Gbit/s on the wire")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        for l in b.links.iter().filter(|l| class(&l.links) == *c) {
            let y = l.measured.interface_bps / 1e9;
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, y), (t_max * 1.02, y)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))
                .map_err(|x| e(&x))?
                .label(format!("raw TCP on {} ({y:.2})", l.links))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        }
        for (i, r) in rows.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            let style = if r.peer == "qemu" {
                colour.stroke_width(2)
            } else {
                colour.stroke_width(3)
            };
            chart
                .draw_series(LineSeries::new(r.samples.iter().copied(), style))
                .map_err(|x| e(&x))?
                .label(format!("{} {} on {}", r.peer, r.config, r.links))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// `bench devices`: the client's round trips across each row's switchover, one panel per row
/// (time from the migration's end; requests never answered as red crosses along the top).
pub fn round_trips(b: &crate::devices::DevicesReport, path: &Path) -> Result<(), ChartError> {
    register_font()?;
    let rows: Vec<_> = b.rows.iter().filter(|r| r.error.is_none()).collect();
    let columns = 2usize;
    let lines = rows.len().div_ceil(columns).max(1);
    let root = BitMapBackend::new(path, (1400, 380 * lines as u32)).into_drawing_area();
    let e = ChartError::draw(path);
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let areas = root.split_evenly((lines, columns));
    for (area, r) in areas.iter().zip(&rows) {
        let answered = || r.round_trips.iter().filter_map(|&(t, rtt)| Some((t, rtt?)));
        let y_max = answered().map(|p| p.1).fold(1.0f64, f64::max) * 1.2;
        let (x_min, x_max) = r
            .round_trips
            .iter()
            .fold((-1000.0f64, 1000.0f64), |(lo, hi), p| {
                (lo.min(p.0), hi.max(p.0))
            });
        let title = format!(
            "{} {} on {}: downtime {} ms, gap {:.1} ms, {} lost",
            r.peer,
            r.config,
            r.links,
            r.downtime_ms.map_or("-".into(), |d| d.to_string()),
            r.net_gap_ms,
            r.packets_lost
        );
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x_min..x_max, 0f64..y_max)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("ms from the end of the migration")
            .y_desc("UDP echo round trip (ms)")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(&x))?;
        let colour = if r.peer == "qemu" { BLUE } else { GREEN };
        chart
            .draw_series(answered().map(|p| Circle::new(p, 2, colour.filled())))
            .map_err(|x| e(&x))?;
        chart
            .draw_series(
                r.round_trips
                    .iter()
                    .filter(|p| p.1.is_none())
                    .map(|p| Cross::new((p.0, y_max * 0.97), 3, RED.stroke_width(1))),
            )
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
