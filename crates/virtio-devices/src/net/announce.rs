//! The network follows the VM: once it runs on its new host, frames from its MAC go out on
//! its tap (reverse ARP, as QEMU's announce-self), so every bridge and switch on the way
//! learns the port it is behind now, before the guest says anything itself.
use std::time::{Duration, Instant};

use migratable::MacAddr;
use serde::{Deserialize, Serialize};

use super::tap::Tap;

/// When the announcements go out: `rounds` frames, the first at once, then gaps growing from
/// `initial_ms` by `step_ms` up to `max_ms` (QEMU's defaults: at 0, 50, 200, 450, 800 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub rounds: u32,
    pub initial_ms: u64,
    pub step_ms: u64,
    pub max_ms: u64,
}

impl Default for Announce {
    fn default() -> Self {
        Announce {
            rounds: 5,
            initial_ms: 50,
            step_ms: 100,
            max_ms: 550,
        }
    }
}

/// The most announcements one move sends.
pub const MAX_ROUNDS: u32 = 100;

impl Announce {
    /// Each announcement's time after the VM runs.
    pub fn schedule(&self) -> Vec<Duration> {
        let mut at = 0;
        let mut gap = self.initial_ms;
        (0..self.rounds.min(MAX_ROUNDS))
            .map(|i| {
                if i > 0 {
                    at += gap;
                    gap = (gap + self.step_ms).min(self.max_ms);
                }
                Duration::from_millis(at)
            })
            .collect()
    }
}

/// A reverse ARP request from `mac`, padded to Ethernet's minimum: what QEMU sends.
pub fn rarp(mac: MacAddr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac.0);
    f[32..38].copy_from_slice(&mac.0);
    f
}

/// Sends the announcements on their own thread (the VM runs meanwhile).
pub fn spawn(device: &str, tap: Tap, mac: MacAddr, announce: Announce) {
    let name = device.to_string();
    let r = std::thread::Builder::new()
        .name(format!("{name}-announce"))
        .spawn(move || {
            let t0 = Instant::now();
            let frame = rarp(mac);
            for at in announce.schedule() {
                if let Some(wait) = at.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
                if let Err(e) = tap.send(&frame) {
                    tracing::warn!("{name}: announcing {mac} on {}: {e}", tap.name());
                    return;
                }
            }
            tracing::debug!("{name}: announced {mac} on {}", tap.name());
        });
    if let Err(e) = r {
        tracing::warn!("{device}: no thread to announce {mac}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_qemus() {
        let ms: Vec<u64> = Announce::default()
            .schedule()
            .iter()
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(ms, vec![0, 50, 200, 450, 800]);
        let none = Announce {
            rounds: 0,
            ..Default::default()
        };
        assert!(none.schedule().is_empty());
        let many = Announce {
            rounds: u32::MAX,
            ..Default::default()
        };
        assert_eq!(many.schedule().len(), MAX_ROUNDS as usize);
    }

    #[test]
    fn rarp_says_who_it_is() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = rarp(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[32..38], &mac.0);
    }
}
