//! How many migrations run at once: a fixed number, or `auto`, which adds one while the
//! aggregate throughput (guest RAM sent per second) still grows by [`GAIN`] (doubles the
//! window after a step that raised it by [`FAST_GAIN`]) and steps back from the step that did
//! not help (a saturated link split further only stretches every migration and its downtime).
//! A step that neither proved a gain nor lost follows the drain's model, when it has one.
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

impl Concurrency {
    /// The number, when it is fixed.
    pub fn fixed(self) -> Option<usize> {
        match self {
            Concurrency::Fixed(n) => Some(n),
            Concurrency::Auto => None,
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
/// A level must lower it below this share of the level before to count as a loss: guest
/// RAM per second over [`MEASURE_S`] moves by ±10% from one measurement to the next with the
/// window unchanged (each migration's rounds end with a burst of deltas).
pub const LOSS: f64 = 0.90;
/// A level that raised it by this much doubles the window next (as slow start does): on a
/// host whose cores, not its links, hold the drain back, each migration more takes a share
/// from the guests, and a drain of a few VMs is over before one-by-one steps get there.
pub const FAST_GAIN: f64 = 1.30;
/// After the window changes, throughput is not measured for this long (slow start).
pub const SETTLE_S: f64 = 0.3;
/// Throughput at a level is measured over this long, with the window full throughout.
pub const MEASURE_S: f64 = 0.7;
/// A level that reads as a loss is measured this long before the window goes back for good:
/// a step up costs little while it is measured, going back costs the rest of the drain.
pub const CONFIRM_S: f64 = 2.0 * MEASURE_S;
/// `auto` never goes past this.
pub const AUTO_MAX: usize = 16;

#[derive(Clone, Debug)]
pub struct Window {
    mode: Concurrency,
    level: usize,
    /// Throughput measured at the level before the last step, bytes/s, and that level.
    below: Option<f64>,
    from: usize,
    settled: bool,
    /// The model's makespan at each level from 1 (empty: it cannot say).
    etas: Vec<f64>,
    /// `auto` goes no further than this.
    max: usize,
}

/// A level within this share of the model's best makespan is as good as the best: `auto`
/// starts at the smallest such level (fewer at once: shorter migrations, shorter pauses).
pub const FIRST_WITHIN: f64 = 1.02;

/// A level measured to lose nothing stays unless the model has the level before it end sooner
/// by more than this: the model's own error, which its preference between two neighbouring
/// levels is often within (docs/drain.md, `auto`).
pub const MODEL_ERROR: f64 = 1.10;

/// Where `auto` starts: of the levels from 1 to `n` (the VMs) and at most [`AUTO_MAX`], the
/// smallest whose makespan by the model (`eta`) is within [`FIRST_WITHIN`] of the best.
pub fn first_level(eta: impl Fn(usize) -> f64, n: usize) -> usize {
    let levels: Vec<(usize, f64)> = (1..=n.clamp(1, AUTO_MAX)).map(|c| (c, eta(c))).collect();
    let best = levels
        .iter()
        .map(|l| l.1)
        .filter(|t| t.is_finite())
        .fold(f64::INFINITY, f64::min);
    levels
        .iter()
        .find(|(_, t)| *t <= best * FIRST_WITHIN)
        .map_or(1, |l| l.0)
}

/// The level `auto` runs at once the model started it ([`first_level`]): where its first
/// measurement takes it, within the `n` VMs and what the destinations accept at once.
pub fn runs_at(eta: impl Fn(usize) -> f64, n: usize, at_most: usize) -> usize {
    let etas = (1..=n.clamp(1, AUTO_MAX)).map(eta).collect();
    let mut w = Window::guided(Concurrency::Auto, etas).at_most(at_most.min(n));
    w.observe(SETTLE_S + MEASURE_S, 0.0);
    w.limit()
}

impl Window {
    pub fn new(mode: Concurrency) -> Self {
        Self::starting(mode, 1)
    }

    /// `auto` from `first` (the model's choice) rather than from 1.
    pub fn starting(mode: Concurrency, first: usize) -> Self {
        let level = match mode {
            Concurrency::Fixed(n) => n.max(1),
            Concurrency::Auto => first.clamp(1, AUTO_MAX),
        };
        Window {
            mode,
            level,
            below: None,
            from: level,
            settled: matches!(mode, Concurrency::Fixed(_)),
            etas: Vec::new(),
            max: AUTO_MAX,
        }
    }

    /// `auto` no further than `max` at once (what the destinations accept arriving at
    /// once): a level above it starts no migration more, so it can be neither measured nor
    /// reported as the drain's.
    pub fn at_most(self, max: usize) -> Self {
        let max = max.clamp(1, AUTO_MAX);
        match self.mode {
            Concurrency::Auto => Window {
                level: self.level.min(max),
                from: self.from.min(max),
                max,
                ..self
            },
            Concurrency::Fixed(_) => self,
        }
    }

    /// `auto` from where the model starts it ([`first_level`] of its makespan at each level
    /// from 1, `etas`), which it follows where a step's throughput says nothing either way.
    pub fn guided(mode: Concurrency, etas: Vec<f64>) -> Self {
        let first = first_level(|c| etas.get(c - 1).copied().unwrap_or(f64::NAN), etas.len());
        Window {
            etas,
            ..Self::starting(mode, first)
        }
    }

    /// Whether the model says `level` ends the drain sooner than `than`.
    fn model_prefers(&self, level: usize, than: usize) -> bool {
        matches!((self.eta(level), self.eta(than)), (Some(a), Some(b)) if a < b)
    }

    /// Whether the model has `level` end within its error ([`MODEL_ERROR`]) of `than`, or
    /// sooner.
    fn model_as_good(&self, level: usize, than: usize) -> bool {
        matches!((self.eta(level), self.eta(than)), (Some(a), Some(b)) if a <= b * MODEL_ERROR)
    }

    /// The model's makespan at `level` (None: it cannot say).
    fn eta(&self, level: usize) -> Option<f64> {
        level.checked_sub(1).and_then(|i| self.etas.get(i)).copied()
    }

    /// Migrations that may be in flight now.
    pub fn limit(&self) -> usize {
        self.level
    }

    /// `full_for`: seconds the window has been full (in flight == limit) since it last
    /// changed; `rate`: the aggregate bytes/s since [`SETTLE_S`] into that (a mean over the
    /// level's time, not one measurement). Returns whether the limit changed (the run then
    /// starts counting `full_for` again).
    pub fn observe(&mut self, full_for: f64, rate: f64) -> bool {
        if self.settled || full_for < SETTLE_S + MEASURE_S {
            return false;
        }
        match self.below {
            Some(b) if rate < b * LOSS && full_for < SETTLE_S + CONFIRM_S => return false,
            Some(b) if rate < b * GAIN => return self.unproven(rate >= b * LOSS, rate),
            _ if self.level >= self.max => {
                self.settled = true;
                return false;
            }
            below => {
                // A step that paid well says the bottleneck is far: the next doubles.
                let far = below.is_some_and(|b| rate >= b * FAST_GAIN);
                let step = if far { self.level } else { 1 };
                self.below = Some(rate);
                self.from = self.level;
                self.level = (self.level + step).min(self.max);
            }
        }
        true
    }

    /// The last step raised throughput less than [`GAIN`]. Where it lost none beyond
    /// [`LOSS`] (`kept`), that is within the noise and the model decides: on by one while it says the next
    /// level ends sooner, here where it says this one ends as soon as the last (within
    /// [`MODEL_ERROR`]: the level measured to lose nothing stays).
    /// Else back to where it came from, for good. Whether the limit changed.
    fn unproven(&mut self, kept: bool, rate: f64) -> bool {
        if kept && self.level < self.max && self.model_prefers(self.level + 1, self.level) {
            self.below = Some(rate);
            self.from = self.level;
            self.level = (self.level + 1).min(self.max);
            return true;
        }
        self.settled = true;
        if kept && self.model_as_good(self.level, self.from) {
            return false;
        }
        self.level = self.from.max(1);
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
    fn auto_runs_a_step_past_where_the_model_starts_it() {
        let etas = [20.0, 12.0, 11.9, 12.5, 12.6, 12.6];
        let eta = |c: usize| etas[c - 1];
        assert_eq!(first_level(eta, 6), 2);
        assert_eq!(runs_at(eta, 6, 16), 3);
        assert_eq!(runs_at(eta, 2, 16), 2, "two VMs");
        assert_eq!(runs_at(eta, 6, 2), 2, "the destinations take two at once");
    }

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
        assert!(w.observe(1.0, 120.0), "+20%: one more");
        assert_eq!(w.limit(), 3);
        assert!(w.observe(1.0, 200.0), "+67%: the bottleneck is far, double");
        assert_eq!(w.limit(), 6);
        assert!(w.observe(1.0, 205.0), "+3%: the link is full");
        assert_eq!(w.limit(), 3, "back to where the last step came from");
        assert!(w.settled());
        assert!(!w.observe(5.0, 1000.0), "settled for good");
        assert_eq!(w.limit(), 3);
    }

    #[test]
    fn a_saturated_single_link_settles_at_one() {
        let mut w = Window::new(Concurrency::Auto);
        w.observe(1.0, 100.0);
        w.observe(1.0, 101.0);
        assert_eq!(w.limit(), 1);
    }

    #[test]
    fn auto_starts_at_the_smallest_level_near_the_models_best() {
        // 4 VMs; the model: 20 s alone, 12 s two at once, then flat or worse.
        let eta = |c: usize| [20.0, 12.0, 11.8, 14.0][c - 1];
        assert_eq!(first_level(eta, 4), 2, "12.0 is within 2% of 11.8");
        let eta = |c: usize| [20.0, 12.3, 11.8, 14.0][c - 1];
        assert_eq!(first_level(eta, 4), 3, "12.3 is not");
        assert_eq!(first_level(|_| f64::NAN, 4), 1);
        assert_eq!(first_level(|c| 10.0 / c as f64, 100), AUTO_MAX);
        let mut w = Window::starting(Concurrency::Auto, 3);
        assert_eq!(w.limit(), 3);
        assert!(w.observe(1.0, 100.0));
        assert_eq!(w.limit(), 4);
        assert!(w.observe(1.0, 94.0));
        assert_eq!(w.limit(), 3, "back to where it started, not below");
        assert_eq!(Window::starting(Concurrency::Fixed(2), 5).limit(), 2);
    }

    #[test]
    fn where_a_step_neither_pays_nor_loses_auto_follows_the_model() {
        // The model: 20 s alone, then 11.9, 11.8, 11.7 and 12.5. It starts at 2 (within 2%
        // of the best).
        let etas = vec![20.0, 11.9, 11.8, 11.7, 12.5];
        let mut w = Window::guided(Concurrency::Auto, etas.clone());
        assert_eq!(w.limit(), 2);
        assert!(w.observe(1.0, 100.0));
        assert_eq!(w.limit(), 3);
        // +4%: no proof, no loss; the model says 4 ends sooner still: on to 4.
        assert!(w.observe(1.0, 104.0));
        assert_eq!(w.limit(), 4);
        // +1% again: the model says 5 ends later, 4 sooner than 3: it stays.
        assert!(!w.observe(1.0, 105.0));
        assert_eq!(w.limit(), 4);
        assert!(w.settled());
        // A step that lost throughput, measured long enough, goes back whatever the model
        // says.
        let mut w = Window::guided(Concurrency::Auto, etas.clone());
        w.observe(1.0, 100.0);
        assert!(!w.observe(1.0, 85.0), "a loss is measured again");
        assert!(w.observe(SETTLE_S + CONFIRM_S, 86.0));
        assert_eq!(w.limit(), 2);
        assert!(w.settled());
        // One that lost less than a measurement's noise lost nothing: the model decides.
        let mut w = Window::guided(Concurrency::Auto, etas.clone());
        w.observe(1.0, 100.0);
        assert!(w.observe(1.0, 92.0));
        assert_eq!(w.limit(), 4);
        // Without the model, a step short of the gain goes back.
        let mut w = Window::starting(Concurrency::Auto, 2);
        w.observe(1.0, 100.0);
        w.observe(1.0, 104.0);
        assert_eq!(w.limit(), 2);
        // Where the model says the level the step came from ends sooner by more than its
        // error, back too.
        let mut w = Window::guided(Concurrency::Auto, vec![20.0, 11.0, 12.5]);
        w.observe(1.0, 100.0);
        w.observe(1.0, 104.0);
        assert_eq!(w.limit(), 2);
        // Within it, the level measured to lose nothing stays.
        let mut w = Window::guided(Concurrency::Auto, vec![20.0, 11.0, 11.8]);
        w.observe(1.0, 100.0);
        assert!(!w.observe(1.0, 104.0));
        assert_eq!(w.limit(), 3);
        assert!(w.settled());
    }

    #[test]
    fn a_level_that_reads_as_a_loss_is_judged_on_its_mean_over_twice_as_long() {
        // The model: 2 to 5 alike; `auto` starts at 2 and steps to 3.
        let etas = vec![20.0, 12.0, 12.0, 12.0, 12.0];
        let mut w = Window::guided(Concurrency::Auto, etas);
        assert!(w.observe(1.0, 100.0));
        assert_eq!(w.limit(), 3);
        // The first measurement at 3 reads 12% down: not yet a reason to go back for good.
        assert!(!w.observe(SETTLE_S + MEASURE_S, 88.0));
        assert!(!w.observe(SETTLE_S + 1.2, 89.0));
        assert!(!w.settled());
        // Over twice as long the mean is 5% down: within the noise, and the model has 3 as
        // good as 2, so 3 stays.
        assert!(!w.observe(SETTLE_S + CONFIRM_S, 95.0));
        assert_eq!(w.limit(), 3);
        assert!(w.settled());
    }

    #[test]
    fn auto_never_steps_past_what_the_destinations_accept_at_once() {
        // One destination that takes 4 arriving at once; the model has 4 to 6 alike.
        let etas = vec![9.0, 5.7, 4.6, 4.1, 4.1, 4.1];
        let mut w = Window::guided(Concurrency::Auto, etas.clone()).at_most(4);
        assert_eq!(w.limit(), 4);
        assert!(!w.observe(1.0, 100.0), "no level above to try");
        assert_eq!(w.limit(), 4);
        assert!(w.settled());
        // Growing, it stops there too.
        let mut w = Window::starting(Concurrency::Auto, 2).at_most(5);
        assert!(w.observe(1.0, 100.0));
        assert!(w.observe(1.0, 200.0), "far: it would double to 6");
        assert_eq!(w.limit(), 5);
        assert!(!w.observe(1.0, 400.0));
        assert!(w.settled());
        assert_eq!(Window::starting(Concurrency::Auto, 6).at_most(4).limit(), 4);
        assert_eq!(Window::new(Concurrency::Fixed(6)).at_most(4).limit(), 6);
    }

    #[test]
    fn concurrency_parses() {
        assert_eq!("auto".parse(), Ok(Concurrency::Auto));
        assert_eq!("4".parse(), Ok(Concurrency::Fixed(4)));
        assert!("0".parse::<Concurrency>().is_err());
        assert!("x".parse::<Concurrency>().is_err());
    }
}
