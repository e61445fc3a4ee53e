//! The bench's printed table and ratios.
use crate::transports::{BenchReport, Row};

fn opt_ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// One row as a progress line.
pub fn line(r: &Row) -> String {
    let pace = r.guest_rate.map_or(String::new(), |g| {
        format!(
            ", guest {:.0}% of its pace ({:.0}/s against {:.0}/s)",
            g.ratio * 100.0,
            g.during_per_s,
            g.before_per_s
        )
    });
    format!(
        "{} {} over {}: {:.2} s, {:.2} Gbit/s ({:.0}% of the link), downtime {} ms, {:.0} MiB, verified {}{pace}",
        r.peer,
        r.config,
        r.links,
        r.total_ms as f64 / 1e3,
        r.avg_gbps,
        r.utilisation * 100.0,
        opt_ms(r.downtime_ms),
        r.wire_bytes as f64 / (1 << 20) as f64,
        if r.verified { "yes" } else { "NO" }
    )
}

pub fn render(b: &BenchReport) -> String {
    let mut s = format!(
        "livemig bench {}: {} MiB, {} vCPUs, workload {}, memory {}, downtime target {} ms, link scale {}\n\n",
        b.suite,
        b.memory_bytes >> 20,
        b.vcpus,
        b.workload,
        b.memory_profile,
        b.downtime_target_ms,
        b.scale
    );
    s += "links (raw TCP stream, same run):\n";
    for l in &b.links {
        s += &format!(
            "  {:<12} goodput {:>6.3} Gbit/s, on the interface {:>6.3}; shaped {:.2}, nominal {:.1}\n",
            l.links,
            l.measured.goodput_bps / 1e9,
            l.measured.interface_bps / 1e9,
            l.shaped_gbps,
            l.nominal_gbps
        );
    }
    s += "\n";
    let header = [
        "peer", "config", "link", "total s", "Gbit/s", "util", "downtime", "cpu src", "cpu dst",
        "wire MiB", "deltas", "verified",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in &b.rows {
        cells.push(vec![
            r.peer.clone(),
            r.config.clone(),
            r.links.clone(),
            if r.error.is_some() {
                "FAILED".into()
            } else {
                format!("{:.2}", r.total_ms as f64 / 1e3)
            },
            format!("{:.3}", r.avg_gbps),
            format!("{:.1}%", r.utilisation * 100.0),
            r.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
            opt_s(r.cpu_source_s),
            opt_s(r.cpu_destination_s),
            format!("{:.0}", r.wire_bytes as f64 / (1 << 20) as f64),
            r.delta_pages.map_or("-".into(), |n| n.to_string()),
            if r.verified { "yes" } else { "NO" }.into(),
        ]);
    }
    s += &grid(&cells, 3);
    s += &pace_and_faults(b);
    for r in &b.rows {
        if let Some(e) = &r.error {
            s += &format!("  {} {} over {} failed: {e}\n", r.peer, r.config, r.links);
        }
    }
    s += &comparisons(b);
    for n in &b.notes {
        s += &format!("\nnote: {n}");
    }
    s + "\n"
}

/// Cells in columns under a ruled header row, the first `left` columns aligned left.
pub fn grid(cells: &[Vec<String>], left: usize) -> String {
    let columns = cells.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            cells
                .iter()
                .map(|c| c.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for (n, row) in cells.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < left {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        s += line.join("  ").trim_end();
        s += "\n";
        if n == 0 {
            s += &"-".repeat(widths.iter().sum::<usize>() + 2 * columns.saturating_sub(1));
            s += "\n";
        }
    }
    s
}

/// The table's tail: livemig against QEMU, and what TLS costs.
/// `bench postcopy`'s columns: the guest's own pace and post-copy's faults.
fn pace_and_faults(b: &BenchReport) -> String {
    if b.rows.iter().all(|r| r.guest_rate.is_none()) {
        return String::new();
    }
    let header = [
        "peer",
        "config",
        "link",
        "pace before",
        "during",
        "kept",
        "fault p50",
        "p99",
        "mean",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let us = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v} us"));
    for r in &b.rows {
        let g = r.guest_rate;
        cells.push(vec![
            r.peer.clone(),
            r.config.clone(),
            r.links.clone(),
            g.map_or("-".into(), |g| format!("{:.0}/s", g.before_per_s)),
            g.map_or("-".into(), |g| format!("{:.0}/s", g.during_per_s)),
            g.map_or("-".into(), |g| format!("{:.0}%", g.ratio * 100.0)),
            us(r.fault_p50_us),
            us(r.fault_p99_us),
            us(r.fault_mean_us),
        ]);
    }
    "\nthe guest's pages written per second (its console) and post-copy's faults:\n".to_string()
        + &grid(&cells, 3)
}

fn comparisons(b: &BenchReport) -> String {
    let mut s = String::new();
    if !b.ratios.is_empty() {
        s += "\nlivemig / QEMU (lower is better for livemig):\n";
        for q in &b.ratios {
            s += &format!(
                "  {:<32} vs {:<22} total {:.2}x, downtime {}, wire bytes {:.2}x, source cpu {}\n",
                q.livemig,
                q.qemu,
                q.total,
                q.downtime.map_or("-".into(), |d| format!("{d:.2}x")),
                q.wire_bytes,
                q.cpu_source.map_or("-".into(), |c| format!("{c:.2}x")),
            );
        }
    }
    if !b.tls_costs.is_empty() {
        s += &format!(
            "\nmutual TLS (rustls, user space; kernel TLS {}) against plaintext, same VM and links:\n",
            if transport::kernel_tls() {
                "offered by this kernel but not used"
            } else {
                "not offered here"
            }
        );
        for c in &b.tls_costs {
            s += &format!(
                "  {:<22} {:<12} {:>6.2} s -> {:>6.2} s ({:.2}x), cpu src {} -> {}, cpu dst {} -> {}\n",
                c.config,
                c.links,
                c.plain_ms as f64 / 1e3,
                c.tls_ms as f64 / 1e3,
                c.time,
                opt_s(c.cpu_source_plain_s),
                opt_s(c.cpu_source_tls_s),
                opt_s(c.cpu_destination_plain_s),
                opt_s(c.cpu_destination_tls_s),
            );
        }
    }
    s
}
