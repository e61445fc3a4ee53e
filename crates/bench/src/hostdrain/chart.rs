//! The drain bench's chart: per configuration, the aggregate throughput over time (with the
//! links' raw goodput dashed) and a timeline with one bar per VM migration.
use std::path::Path;

use plotters::prelude::*;

use super::{DrainBenchReport, DrainRow};

const PANEL_H: u32 = 260;

pub fn draw(b: &DrainBenchReport, path: &Path) -> Result<(), crate::chart::ChartError> {
    crate::chart::register_font()?;
    let rows: Vec<&DrainRow> = b.rows.iter().filter(|r| r.error.is_none()).collect();
    let n = rows.len().max(1);
    let root = BitMapBackend::new(path, (1600, PANEL_H * n as u32)).into_drawing_area();
    let e = crate::chart::ChartError::draw(path);
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let t_max = rows
        .iter()
        .map(|r| r.makespan_ms as f64 / 1e3)
        .fold(1.0, f64::max);
    for (area, r) in root.split_evenly((n, 1)).iter().zip(&rows) {
        let (left, right) = area.split_horizontally(800);
        throughput(&left, b, r, t_max).map_err(|x| e(&x))?;
        timeline(&right, r, t_max).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn throughput(area: &Area, b: &DrainBenchReport, r: &DrainRow, t_max: f64) -> DrawResult {
    let link = b
        .links
        .iter()
        .find(|l| l.links == r.links)
        .map_or(0.0, |l| l.measured.interface_bps / 1e9);
    let y_max = r.throughput.iter().map(|s| s.1).fold(link, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{} {} on {}: {:.1} s",
                r.peer,
                r.config,
                r.links,
                r.makespan_ms as f64 / 1e3
            ),
            ("sans-serif", 18),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..t_max * 1.02, 0f64..y_max.max(0.1))?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("Gbit/s")
        .label_style(("sans-serif", 12))
        .draw()?;
    chart.draw_series(DashedLineSeries::new(
        [(0.0, link), (t_max * 1.02, link)],
        6,
        4,
        BLACK.stroke_width(1),
    ))?;
    let colour = if r.peer == "qemu" { RED } else { BLUE };
    chart.draw_series(LineSeries::new(
        r.throughput.iter().copied(),
        colour.stroke_width(2),
    ))?;
    Ok(())
}

fn timeline(area: &Area, r: &DrainRow, t_max: f64) -> DrawResult {
    let n = r.timeline.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption("one bar per VM migration", ("sans-serif", 14))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max * 1.02, 0f64..n as f64)?;
    let names: Vec<String> = r.timeline.iter().map(|v| v.name.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| names.get(y.floor() as usize).cloned().unwrap_or_default())
        .x_desc("s")
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, v) in r.timeline.iter().enumerate() {
        let colour = if !v.moved {
            RED.mix(0.8)
        } else if v.verified {
            GREEN.mix(0.7)
        } else {
            YELLOW.mix(0.8)
        };
        let (x0, x1) = (v.start_ms as f64 / 1e3, v.end_ms as f64 / 1e3);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x0, i as f64 + 0.15), (x1.max(x0 + 0.01), i as f64 + 0.85)],
            colour.filled(),
        )))?;
    }
    Ok(())
}
