//! One bandwidth budget for the whole drain: `--max-bandwidth` shared evenly by the
//! migrations in flight, and `--reserve` of each destination's link left for other traffic.
//! Each VM's migration runs in its own process with its own pace, so fairness is kept by
//! re-pacing every migration whenever the set in flight changes: the paces always sum to at
//! most the budget. Pure: the run applies what this returns.

/// The budget: None where nothing limits the drain.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Budget {
    /// Bits/s for the whole drain.
    pub max_bandwidth: Option<u64>,
    /// Share of each link kept free, 0..1.
    pub reserve: f64,
    /// Share of each host's cores kept for the guests, 0..1 (`--reserve-cpu`): the run
    /// lowers `max_bandwidth` while the migrations take more ([`crate::cpu::Governor`]).
    pub reserve_cpu: Option<f64>,
}

/// Each migration's pace in bits/s, per destination: `in_flight[d]` migrations on a link
/// that carries `links[d]` bits/s (None: unmeasured). None: unpaced.
pub fn paces(budget: &Budget, in_flight: &[usize], links: &[Option<f64>]) -> Vec<Option<u64>> {
    let total: usize = in_flight.iter().sum();
    let global = budget
        .max_bandwidth
        .filter(|_| total > 0)
        .map(|b| b as f64 / total as f64);
    in_flight
        .iter()
        .zip(links)
        .map(|(n, link)| {
            let per_link = link
                .filter(|_| budget.reserve > 0.0 && *n > 0)
                .map(|l| l * (1.0 - budget.reserve.clamp(0.0, 0.95)) / *n as f64);
            let pace = match (global, per_link) {
                (Some(g), Some(l)) => Some(g.min(l)),
                (g, l) => g.or(l),
            };
            // Positive and finite; `as` saturates.
            #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
            pace.map(|p| p.max(1.0) as u64)
        })
        .collect()
}

/// What each destination's link carries for the drain in all, bytes/s, when `per_dest[d]`
/// migrations go to it at once: its measured rate (None: unmeasured) within the budget's
/// share of it, as the run's paces will allow. None: neither measured nor budgeted.
pub fn budgeted(budget: &Budget, per_dest: &[usize], links: &[Option<f64>]) -> Vec<Option<f64>> {
    let bits: Vec<Option<f64>> = links.iter().map(|l| l.map(|r| r * 8.0)).collect();
    paces(budget, per_dest, &bits)
        .into_iter()
        .zip(per_dest)
        .zip(links)
        .map(|((pace, n), link)| {
            let capped = pace.map(|p| p as f64 * (*n).max(1) as f64 / 8.0);
            match (capped, *link) {
                (Some(c), Some(l)) => Some(c.min(l)),
                (c, l) => c.or(l),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_sees_each_link_within_the_budget() {
        // 4 Mbit/s for the whole drain, two migrations to each of two 1 Gbit/s links: each
        // link carries 2 Mbit/s of it (250 kB/s).
        let b = Budget {
            max_bandwidth: Some(4_000_000),
            reserve: 0.0,
            reserve_cpu: None,
        };
        let r = budgeted(&b, &[2, 2], &[Some(125e6), Some(125e6)]);
        assert_eq!(r, [Some(250_000.0), Some(250_000.0)]);
        // No budget: the links as measured; a reserve takes its share; unmeasured and
        // unbudgeted stays unknown.
        assert_eq!(
            budgeted(&Budget::default(), &[2], &[Some(1e8)]),
            [Some(1e8)]
        );
        let reserve = Budget {
            max_bandwidth: None,
            reserve: 0.5,
            reserve_cpu: None,
        };
        assert_eq!(budgeted(&reserve, &[2], &[Some(1e8)]), [Some(5e7)]);
        assert_eq!(budgeted(&Budget::default(), &[1], &[None]), [None]);
    }

    #[test]
    fn nothing_limits_an_unbudgeted_drain() {
        assert_eq!(
            paces(&Budget::default(), &[2, 1], &[Some(1e9), None]),
            [None, None]
        );
    }

    #[test]
    fn the_budget_is_split_evenly_and_never_exceeded() {
        let b = Budget {
            max_bandwidth: Some(900_000_000),
            reserve: 0.0,
            reserve_cpu: None,
        };
        let p = paces(&b, &[2, 1], &[None, None]);
        assert_eq!(p, [Some(300_000_000), Some(300_000_000)]);
        let sum: u64 = p.iter().zip([2, 1]).map(|(p, n)| p.unwrap() * n).sum();
        assert!(sum <= 900_000_000);
    }

    #[test]
    fn a_reserve_leaves_part_of_each_link_and_the_tighter_limit_wins() {
        let b = Budget {
            max_bandwidth: Some(10_000_000_000),
            reserve: 0.2,
            reserve_cpu: None,
        };
        let p = paces(&b, &[2, 0], &[Some(1e9), Some(1e10)]);
        assert_eq!(p[0], Some(400_000_000), "the link less 20%, halved");
        let tight = Budget {
            max_bandwidth: Some(500_000_000),
            reserve: 0.2,
            reserve_cpu: None,
        };
        assert_eq!(paces(&tight, &[1], &[Some(1e9)]), [Some(500_000_000)]);
    }
}
