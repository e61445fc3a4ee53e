//! The drain bench's printed table, the reference's scenarios and the notes.
use super::{DrainBenchReport, DrainRow};

/// One row as a progress line.
pub fn line(r: &DrainRow) -> String {
    format!(
        "{} {} over {}: makespan {:.1} s (model {:.1} s, {:+.0}%), {:.2} GiB/s of RAM, {:.2} Gbit/s ({:.0}% of the link), downtime max {} ms, {}/{} verified",
        r.peer,
        r.config,
        r.links,
        r.makespan_ms as f64 / 1e3,
        r.predicted_makespan_ms as f64 / 1e3,
        r.model_error * 100.0,
        r.ram_gib_per_s,
        r.wire_gbps,
        r.utilisation * 100.0,
        r.downtime_ms_max,
        r.verified,
        r.vms
    )
}

/// The guests' share of the source's cores, before → during the drain.
fn guests(r: &DrainRow) -> String {
    match (r.guests_cpu_before, r.guests_cpu_during) {
        (Some(b), Some(d)) => format!("{:.0}>{:.0}%", b * 100.0, d * 100.0),
        _ => "-".into(),
    }
}

/// MiB a lever did not send, or `-` where the peer does not say.
fn saved(mib: Option<f64>) -> String {
    mib.map_or("-".into(), |m| format!("{m:.0}M"))
}

fn minutes(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The reference's scenarios as the model predicts them.
pub fn references(refs: &[drain::model::Reference], measured_ratio: Option<f64>) -> String {
    let mut s = format!(
        "\nthe reference's scenarios, predicted (guests compress to {}, dirty {} MB/s; 2 at once):\n",
        measured_ratio.map_or(
            format!("{:.2} (assumed)", super::DEFAULT_COMPRESS_RATIO),
            |c| format!("{c:.2} (measured here)")
        ),
        super::REFERENCE_DIRTY_MB_S
    );
    s += &format!(
        "  {:<48} {:<11} {:>10} {:>10}\n",
        "SCENARIO", "LINK", "REFERENCE", "MODEL"
    );
    for r in refs {
        s += &format!(
            "  {:<48} {:<11} {:>10} {:>10}\n",
            r.scenario,
            r.link,
            r.reference_s.map_or("-".into(), minutes),
            minutes(r.predicted_s)
        );
    }
    s
}

pub fn render(b: &DrainBenchReport) -> String {
    let ram: u64 = b.vms.iter().map(|v| v.memory).sum();
    let mut s = format!(
        "livemig bench drain: {} VMs, {} MiB in all ({}), {}, link scale {}\n\nlinks (raw TCP stream, same run):\n",
        b.vms.len(),
        ram >> 20,
        b.vms.iter().map(|v| v.workload.as_str()).collect::<Vec<_>>().join(", "),
        if b.tls { "mutual TLS" } else { "plaintext" },
        b.scale
    );
    for l in &b.links {
        s += &format!(
            "  {:<12} goodput {:.3} Gbit/s ({:.3} on the interface)\n",
            l.links,
            l.measured.goodput_bps / 1e9,
            l.measured.interface_bps / 1e9
        );
    }
    s += &format!(
        "\n{:<7} {:<34} {:<12} {:>9} {:>9} {:>6} {:>7} {:>6} {:>5} {:>7} {:>7} {:>7} {:>6} {:>6} {:>9} {:>8} {:>7}\n",
        "PEER",
        "CONFIG",
        "LINKS",
        "MAKESPAN",
        "MODEL",
        "ERR",
        "GiB/s",
        "Gbit/s",
        "UTIL",
        "DELTA",
        "REFS",
        "DT-SUM",
        "DT-MAX",
        "CPU-s",
        "GUESTS",
        "VERIFIED",
        "SPEEDUP"
    );
    for r in &b.rows {
        if let Some(e) = &r.error {
            s += &format!(
                "{:<7} {:<34} {:<12} FAILED: {e}\n",
                r.peer, r.config, r.links
            );
            continue;
        }
        s += &format!(
            "{:<7} {:<34} {:<12} {:>8.1}s {:>8.1}s {:>+5.0}% {:>7.3} {:>6.2} {:>4.0}% {:>7} {:>7} {:>6}ms {:>4}ms {:>6.1} {:>9} {:>5}/{:<2} {:>6.1}x\n",
            r.peer,
            r.config,
            r.links,
            r.makespan_ms as f64 / 1e3,
            r.predicted_makespan_ms as f64 / 1e3,
            r.model_error * 100.0,
            r.ram_gib_per_s,
            r.wire_gbps,
            r.utilisation * 100.0,
            saved(r.delta_mib_saved),
            saved(r.ref_mib_saved),
            r.downtime_ms_sum,
            r.downtime_ms_max,
            r.cpu_seconds,
            guests(r),
            r.verified,
            r.vms,
            r.speedup.unwrap_or(f64::NAN)
        );
    }
    s += &references(&b.references, b.guest_compress_ratio);
    for n in &b.notes {
        s += &format!("\nnote: {n}");
    }
    s + "\n"
}
