//! Page-batch compression (lz4, zstd) and the adaptive choice between them and raw.
//!
//! The choice is made per batch from measured rates: compressing pays only when the codec,
//! spread over the workers, delivers more useful bytes per second than the link carries raw.
//! A fast link, incompressible pages or a CPU taken by the guest all make raw win; that is
//! Hyper-V's fallback, decided continuously.
/// A batch that would not decompress as its frame said.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CodecError {
    /// {codec:?}: {why}
    Corrupt { codec: Codec, why: String },
    /// decompressed to {got} bytes, the frame said {want}
    Length { got: usize, want: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Lz4 = 1,
    Zstd = 2,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Level 3: on the `server` profile 0.56 of raw at ~390 MB/s a core, against 0.61 at level 1
/// (680 MB/s) and 0.55 at level 9 (110 MB/s); lz4 gives 0.68 at ~900 MB/s.
pub const ZSTD_LEVEL: i32 = 3;

/// zstd at [`ZSTD_LEVEL`] keeping its context from one call to the next: making one costs
/// more than packing a page, and a sample packs thousands.
pub struct Zstd(zstd::bulk::Compressor<'static>);

impl Zstd {
    pub fn new() -> std::io::Result<Self> {
        Ok(Zstd(zstd::bulk::Compressor::new(ZSTD_LEVEL)?))
    }

    /// Compresses `input` into `out` (cleared first).
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        out.resize(zstd::zstd_safe::compress_bound(input.len()), 0);
        let n = self.0.compress_to_buffer(input, out.as_mut_slice())?;
        out.truncate(n);
        Ok(())
    }
}

/// Compresses `input` into `out` (cleared first).
pub fn compress(codec: Codec, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    out.clear();
    match codec {
        Codec::Lz4 => {
            out.resize(lz4_flex::block::get_maximum_output_size(input.len()), 0);
            let n = lz4_flex::block::compress_into(input, out).map_err(std::io::Error::other)?;
            out.truncate(n);
        }
        Codec::Zstd => Zstd::new()?.compress(input, out)?,
    }
    Ok(())
}

/// Decompresses into `out`, which must come out exactly `raw_len` bytes long.
pub fn decompress(
    codec: Codec,
    input: &[u8],
    raw_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let bad = |why: String| CodecError::Corrupt { codec, why };
    out.clear();
    out.resize(raw_len, 0);
    let n = match codec {
        Codec::Lz4 => {
            lz4_flex::block::decompress_into(input, out).map_err(|e| bad(e.to_string()))?
        }
        Codec::Zstd => {
            zstd::bulk::decompress_to_buffer(input, out).map_err(|e| bad(e.to_string()))?
        }
    };
    if n != raw_len {
        return Err(CodecError::Length {
            got: n,
            want: raw_len,
        });
    }
    Ok(())
}

/// What to do with the next batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Raw,
    Compress(Codec),
}

/// Running estimates, in bytes per second of *input*; ratio = compressed / raw.
#[derive(Clone, Copy, Debug)]
pub struct CodecStats {
    pub speed: f64,
    pub ratio: f64,
}

#[derive(Clone, Debug)]
pub struct CodecPolicy {
    /// Bytes/s the link took raw frames at, as measured.
    pub link: f64,
    pub lz4: CodecStats,
    pub zstd: CodecStats,
    pub workers: usize,
    /// Compression must beat raw by this factor to be worth its CPU.
    pub margin: f64,
    /// A `--max-bandwidth` cap in bytes/s: the link can be no faster, whatever it measures
    /// (the cap throttles before the socket, so the socket never looks backlogged).
    pub cap: Option<f64>,
    batches: u64,
    link_samples: u64,
}

const EWMA: f64 = 0.2;
/// While compressing, every this many batches the policy tries the other codec.
pub const PROBE_EVERY: u64 = 16;
/// While sending raw, every this many batches it tries lz4 (the cheap probe) to notice when
/// compression would start to pay.
pub const RAW_PROBE_EVERY: u64 = 64;

impl CodecPolicy {
    pub fn new(workers: usize) -> Self {
        CodecPolicy {
            // Starting points until measured: a link as fast as the codecs, so the first
            // batches go raw and get timed; the first link sample replaces this outright.
            link: 1.5e9,
            lz4: CodecStats {
                speed: 1.5e9,
                ratio: 0.6,
            },
            zstd: CodecStats {
                speed: 0.4e9,
                ratio: 0.55,
            },
            workers: workers.max(1),
            margin: 1.1,
            cap: None,
            batches: 0,
            link_samples: 0,
        }
    }

    pub fn with_cap(mut self, cap: Option<f64>) -> Self {
        self.cap = cap;
        self
    }

    /// The link's rate for decisions: as measured, within the cap.
    pub fn link_rate(&self) -> f64 {
        self.cap.map_or(self.link, |c| self.link.min(c))
    }

    /// Useful bytes per second each way of sending would deliver.
    pub fn throughput(&self, c: Choice) -> f64 {
        let link = self.link_rate();
        match c {
            Choice::Raw => link,
            Choice::Compress(codec) => {
                let s = match codec {
                    Codec::Lz4 => self.lz4,
                    Codec::Zstd => self.zstd,
                };
                (s.speed * self.workers as f64).min(link / s.ratio.max(0.01))
            }
        }
    }

    /// The best choice on current figures.
    pub fn best(&self) -> Choice {
        let lz4 = self.throughput(Choice::Compress(Codec::Lz4));
        let zstd = self.throughput(Choice::Compress(Codec::Zstd));
        let (c, t) = if zstd > lz4 {
            (Codec::Zstd, zstd)
        } else {
            (Codec::Lz4, lz4)
        };
        if t > self.link_rate() * self.margin {
            Choice::Compress(c)
        } else {
            Choice::Raw
        }
    }

    /// Whether a batch that compressed from `raw` to `compressed` bytes goes out compressed:
    /// only if that saved something real (a sixteenth), else the receiver's decompression
    /// buys nothing.
    pub fn worth_sending(raw: usize, compressed: usize) -> bool {
        compressed < raw - raw / 16
    }

    /// The choice for the next batch: the best, except for periodic probes of the others.
    pub fn choose(&mut self) -> Choice {
        self.batches += 1;
        let best = self.best();
        match best {
            Choice::Raw if self.batches.is_multiple_of(RAW_PROBE_EVERY) => {
                Choice::Compress(Codec::Lz4)
            }
            Choice::Compress(Codec::Zstd) if self.batches.is_multiple_of(PROBE_EVERY) => {
                Choice::Compress(Codec::Lz4)
            }
            Choice::Compress(Codec::Lz4) if self.batches.is_multiple_of(PROBE_EVERY) => {
                Choice::Compress(Codec::Zstd)
            }
            _ => best,
        }
    }

    pub fn record_codec(&mut self, codec: Codec, raw: usize, compressed: usize, secs: f64) {
        if raw == 0 || secs <= 0.0 {
            return;
        }
        let s = match codec {
            Codec::Lz4 => &mut self.lz4,
            Codec::Zstd => &mut self.zstd,
        };
        s.speed = s.speed * (1.0 - EWMA) + (raw as f64 / secs) * EWMA;
        s.ratio = s.ratio * (1.0 - EWMA) + (compressed as f64 / raw as f64) * EWMA;
    }

    /// A measurement of the link: bytes/s the peer acknowledged over a window. `saturated`
    /// means data waited in our socket buffers all along, so the link set the pace and this
    /// is its rate; otherwise we were the bottleneck and the link is at least this fast.
    pub fn record_link(&mut self, rate: f64, saturated: bool) {
        if !(rate.is_finite() && rate > 0.0) {
            return;
        }
        if saturated {
            self.link = if self.link_samples == 0 {
                rate
            } else {
                self.link * (1.0 - EWMA) + rate * EWMA
            };
            self.link_samples += 1;
        } else if rate > self.link {
            self.link = rate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page(i: usize) -> Vec<u8> {
        format!("page {i}: the quick brown fox jumps over the lazy dog; ")
            .repeat(80)
            .into_bytes()[..4096]
            .to_vec()
    }

    #[test]
    fn codecs_round_trip_compressible_and_incompressible_data() {
        let mut text = Vec::new();
        for i in 0..64 {
            text.extend(text_page(i));
        }
        let mut random = vec![0u8; 64 * 4096];
        let mut x = 0x12345678u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for codec in [Codec::Lz4, Codec::Zstd] {
            for (name, data) in [("text", &text), ("random", &random)] {
                let mut c = Vec::new();
                compress(codec, data, &mut c).unwrap();
                let mut d = Vec::new();
                decompress(codec, &c, data.len(), &mut d).unwrap();
                assert!(d == *data, "{codec:?} {name}");
                if name == "text" {
                    assert!(c.len() < data.len() / 4, "{codec:?} compresses text");
                }
            }
        }
    }

    #[test]
    fn bad_compressed_data_is_refused() {
        let mut c = Vec::new();
        compress(Codec::Lz4, &text_page(1), &mut c).unwrap();
        let mut d = Vec::new();
        assert!(
            decompress(Codec::Lz4, &c, 8192, &mut d).is_err(),
            "wrong length"
        );
        assert!(
            decompress(Codec::Zstd, &c, 4096, &mut d).is_err(),
            "wrong codec"
        );
        assert!(
            decompress(Codec::Lz4, &c[..c.len() / 2], 4096, &mut d).is_err(),
            "truncated"
        );
        assert!(decompress(Codec::Zstd, b"garbage", 4096, &mut d).is_err());
    }

    #[test]
    fn slow_link_and_compressible_pages_compress() {
        let mut p = CodecPolicy::new(2);
        p.link = 117e6; // 1 GbE
        p.lz4 = CodecStats {
            speed: 1.5e9,
            ratio: 0.5,
        };
        p.zstd = CodecStats {
            speed: 0.5e9,
            ratio: 0.35,
        };
        assert_eq!(p.best(), Choice::Compress(Codec::Zstd));
    }

    #[test]
    fn fast_link_sends_raw() {
        let mut p = CodecPolicy::new(2);
        p.link = 5e9; // faster than any codec on two workers
        p.lz4 = CodecStats {
            speed: 1.5e9,
            ratio: 0.5,
        };
        assert_eq!(p.best(), Choice::Raw);
    }

    #[test]
    fn incompressible_pages_send_raw() {
        let mut p = CodecPolicy::new(2);
        p.link = 117e6;
        p.lz4 = CodecStats {
            speed: 1.5e9,
            ratio: 0.99,
        };
        p.zstd = CodecStats {
            speed: 0.5e9,
            ratio: 0.98,
        };
        assert_eq!(p.best(), Choice::Raw);
    }

    #[test]
    fn contended_cpu_sends_raw() {
        let mut p = CodecPolicy::new(1);
        p.link = 117e6;
        // The guest holds the CPU: the codec crawls.
        p.lz4 = CodecStats {
            speed: 60e6,
            ratio: 0.5,
        };
        p.zstd = CodecStats {
            speed: 20e6,
            ratio: 0.35,
        };
        assert_eq!(p.best(), Choice::Raw);
    }

    #[test]
    fn measurements_move_the_choice_and_probes_keep_coming() {
        let mut p = CodecPolicy::new(2);
        p.link = 117e6;
        for _ in 0..40 {
            p.record_codec(Codec::Lz4, 1 << 20, 1 << 20, 0.001);
            p.record_codec(Codec::Zstd, 1 << 20, 1 << 20, 0.003);
        }
        assert_eq!(p.best(), Choice::Raw, "incompressible now");
        let picks: Vec<Choice> = (0..RAW_PROBE_EVERY).map(|_| p.choose()).collect();
        let lz4 = picks
            .iter()
            .filter(|c| **c == Choice::Compress(Codec::Lz4))
            .count();
        assert_eq!(lz4, 1, "one cheap probe while raw");
        assert_eq!(
            picks.iter().filter(|c| **c == Choice::Raw).count() as u64,
            RAW_PROBE_EVERY - 1
        );
        // While compressing, the other codec gets probed.
        p.lz4 = CodecStats {
            speed: 1.5e9,
            ratio: 0.5,
        };
        let picks: Vec<Choice> = (0..PROBE_EVERY).map(|_| p.choose()).collect();
        assert!(picks.contains(&Choice::Compress(Codec::Zstd)), "{picks:?}");
        for _ in 0..40 {
            p.record_link(2e9, true); // a 2 GB/s link
        }
        assert!(p.link > 1.5e9);
    }

    #[test]
    fn compression_must_save_something_real() {
        assert!(CodecPolicy::worth_sending(4096, 1000));
        assert!(!CodecPolicy::worth_sending(4096, 3900));
        assert!(!CodecPolicy::worth_sending(4096, 5000));
    }

    #[test]
    fn a_bandwidth_cap_is_a_slow_link() {
        let mut p = CodecPolicy::new(2);
        p.link = 5e9;
        assert_eq!(p.best(), Choice::Raw);
        p.cap = Some(125e6); // --max-bandwidth 1Gbit
        assert!(matches!(p.best(), Choice::Compress(_)));
    }

    #[test]
    fn only_a_saturated_link_can_lower_the_estimate() {
        let mut p = CodecPolicy::new(2);
        p.record_link(30e6, false); // we fed it slowly: says nothing about the link
        assert_eq!(p.link, 1.5e9);
        p.record_link(30e6, true); // backlogged at 30 MB/s: that is the link
        assert_eq!(p.link, 30e6);
        assert!(matches!(p.best(), Choice::Compress(_)));
        p.record_link(3e9, false); // delivered faster than thought: at least that fast
        assert_eq!(p.link, 3e9);
    }
}
