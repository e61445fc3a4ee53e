//! What the operator sees while a host drains: on a terminal, one bar per VM in flight and a
//! total bar (RAM moved, rate, ETA); otherwise a line per event and a total every few seconds.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use migration::Progress;

/// Plain output prints the total this often.
const PLAIN_TOTAL_EVERY: Duration = Duration::from_secs(5);

/// How a drain shows itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    /// Bars on a terminal.
    Bars,
    /// A line per event on stderr.
    Lines,
    /// Nothing (a bench that draws its own progress).
    Off,
}

pub struct View {
    show: Show,
    bars: Option<Bars>,
    last_total: Instant,
    total_bytes: u64,
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    vms: HashMap<String, ProgressBar>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl View {
    /// `total_bytes`: the RAM of every VM the drain will move.
    pub fn new(show: Show, total_bytes: u64) -> Self {
        let bars = (show == Show::Bars).then(|| {
            let multi = MultiProgress::new();
            let total = multi.add(ProgressBar::new(total_bytes));
            total.set_style(style(
                "{prefix:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ));
            total.set_prefix("total");
            Bars {
                multi,
                total,
                vms: HashMap::new(),
            }
        });
        View {
            show,
            bars,
            last_total: Instant::now(),
            total_bytes,
        }
    }

    /// A line above the bars (or on stderr).
    pub fn line(&self, msg: &str) {
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(msg);
            }
            None => self.say(msg),
        }
    }

    fn say(&self, msg: &str) {
        if self.show == Show::Lines {
            eprintln!("{msg}");
        }
    }

    pub fn started(&mut self, name: &str, dest: &str, memory: u64, attempt: u32) {
        let again = if attempt > 1 {
            format!(" (attempt {attempt})")
        } else {
            String::new()
        };
        match &mut self.bars {
            Some(b) => {
                let bar = b.multi.insert_before(&b.total, ProgressBar::new(memory));
                bar.set_style(style(
                    "{prefix:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                ));
                bar.set_prefix(name.to_string());
                bar.set_message(format!("-> {dest}{again}"));
                b.vms.insert(name.to_string(), bar);
            }
            None => self.say(&format!("drain: {name} -> {dest}{again}")),
        }
    }

    pub fn progress(&mut self, name: &str, p: &Progress, dest: &str) {
        if let Some(bar) = self.bars.as_ref().and_then(|b| b.vms.get(name)) {
            bar.set_position(p.bytes_on_wire.min(bar.length().unwrap_or(u64::MAX)));
            bar.set_message(format!("-> {dest} {} r{}", p.phase, p.round));
        }
    }

    pub fn finished(&mut self, name: &str, msg: &str) {
        if let Some(b) = &mut self.bars {
            if let Some(bar) = b.vms.remove(name) {
                bar.finish_and_clear();
                b.multi.remove(&bar);
            }
        }
        self.line(&format!("drain: {name}: {msg}"));
    }

    /// RAM moved so far (VMs done plus those in flight) and the wire's rate, bytes/s.
    pub fn total(&mut self, moved: u64, rate: f64) {
        match &self.bars {
            Some(b) => b.total.set_position(moved.min(self.total_bytes)),
            None if self.last_total.elapsed() >= PLAIN_TOTAL_EVERY => {
                self.last_total = Instant::now();
                self.say(&format!(
                    "drain: {} of {} MiB moved, {:.0} Mbit/s on the wire",
                    moved.min(self.total_bytes) >> 20,
                    self.total_bytes >> 20,
                    rate * 8.0 / 1e6
                ));
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bars {
            b.total.finish_and_clear();
        }
    }
}
