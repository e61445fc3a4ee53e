//! How many migrations run at once: a fixed number, or `auto`, which adds one while the
//! aggregate throughput (guest RAM sent per second) still grows by [`GAIN`] and steps back from the one that did not
//! help (a saturated link split further only stretches every migration and its downtime).
//! Pure: the run feeds it what it measured.
use serde::Serialize;

/// `--concurrency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Concurrency {
    Fixed(usize),
    Auto,
}

impl std::str::FromStr for Concurrency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Concurrency::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Concurrency::Fixed(n)),
                _ => Err(format!(
                    "{s:?} is not a concurrency (a number from 1, or auto)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concurrency::Fixed(n) => write!(f, "{n}"),
            Concurrency::Auto => f.write_str("auto"),
        }
    }
}

/// A level must raise the aggregate throughput by this much to be kept.
pub const GAIN: f64 = 1.10;
/// After the window changes, throughput is not measured for this long (slow start).
pub const SETTLE_S: f64 = 0.3;
/// Throughput at a level is measured over this long, with the window full throughout.
pub const MEASURE_S: f64 = 0.7;
/// `auto` never goes past this.
pub const AUTO_MAX: usize = 16;

#[derive(Clone, Debug)]
pub struct Window {
    mode: Concurrency,
    level: usize,
    /// Throughput measured at the level below, bytes/s.
    below: Option<f64>,
    settled: bool,
}

impl Window {
    pub fn new(mode: Concurrency) -> Self {
        let level = match mode {
            Concurrency::Fixed(n) => n.max(1),
            Concurrency::Auto => 1,
        };
        Window {
            mode,
            level,
            below: None,
            settled: matches!(mode, Concurrency::Fixed(_)),
        }
    }

    /// Migrations that may be in flight now.
    pub fn limit(&self) -> usize {
        self.level
    }

    /// `full_for`: seconds the window has been full (in flight == limit) since it last
    /// changed; `rate`: aggregate bytes/s over the last [`MEASURE_S`]. Returns whether the
    /// limit changed (the run then starts counting `full_for` again).
    pub fn observe(&mut self, full_for: f64, rate: f64) -> bool {
        if self.settled || full_for < SETTLE_S + MEASURE_S {
            return false;
        }
        match self.below {
            Some(b) if rate < b * GAIN => {
                // The last one added did not pay: back to the level below, for good.
                self.level = (self.level - 1).max(1);
                self.settled = true;
            }
            _ if self.level >= AUTO_MAX => {
                self.settled = true;
                return false;
            }
            _ => {
                self.below = Some(rate);
                self.level += 1;
            }
        }
        true
    }

    /// Whether `auto` has found its level (always, for a fixed window).
    pub fn settled(&self) -> bool {
        self.settled
    }

    pub fn mode(&self) -> Concurrency {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_window_never_moves() {
        let mut w = Window::new(Concurrency::Fixed(3));
        assert!(!w.observe(10.0, 1e9));
        assert_eq!(w.limit(), 3);
    }

    #[test]
    fn auto_grows_while_throughput_grows_and_steps_back_when_it_does_not() {
        let mut w = Window::new(Concurrency::Auto);
        assert_eq!(w.limit(), 1);
        assert!(!w.observe(0.5, 100.0), "not measured long enough");
        assert!(w.observe(1.0, 100.0));
        assert_eq!(w.limit(), 2);
        assert!(w.observe(1.0, 190.0), "+90%: keep going");
        assert_eq!(w.limit(), 3);
        assert!(w.observe(1.0, 195.0), "+3%: the link is full");
        assert_eq!(w.limit(), 2);
        assert!(w.settled());
        assert!(!w.observe(5.0, 1000.0), "settled for good");
        assert_eq!(w.limit(), 2);
    }

    #[test]
    fn a_saturated_single_link_settles_at_one() {
        let mut w = Window::new(Concurrency::Auto);
        w.observe(1.0, 100.0);
        w.observe(1.0, 101.0);
        assert_eq!(w.limit(), 1);
    }

    #[test]
    fn concurrency_parses() {
        assert_eq!("auto".parse(), Ok(Concurrency::Auto));
        assert_eq!("4".parse(), Ok(Concurrency::Fixed(4)));
        assert!("0".parse::<Concurrency>().is_err());
        assert!("x".parse::<Concurrency>().is_err());
    }
}
