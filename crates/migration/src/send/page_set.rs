//! A set of guest RAM pages (memfd offsets): one bit per page.
use ram::PAGE_SIZE;

pub(super) struct PageSet {
    bits: Vec<u64>,
    pages: u64,
    len: u64,
}

impl PageSet {
    /// An empty set over `ram_bytes` of guest RAM.
    pub fn new(ram_bytes: u64) -> Self {
        let pages = ram_bytes / PAGE_SIZE;
        PageSet {
            bits: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
            pages,
            len: 0,
        }
    }

    /// Adds the page at `off`; offsets outside RAM are ignored.
    pub fn insert(&mut self, off: u64) {
        let p = off / PAGE_SIZE;
        if p >= self.pages {
            return;
        }
        let (w, b) = ((p / 64) as usize, p % 64);
        if self.bits[w] & (1 << b) == 0 {
            self.bits[w] |= 1 << b;
            self.len += 1;
        }
    }

    /// Takes the page at `off` out.
    pub fn remove(&mut self, off: u64) {
        let p = off / PAGE_SIZE;
        if p >= self.pages {
            return;
        }
        let (w, b) = ((p / 64) as usize, p % 64);
        if self.bits[w] & (1 << b) != 0 {
            self.bits[w] &= !(1 << b);
            self.len -= 1;
        }
    }

    pub fn contains(&self, off: u64) -> bool {
        let p = off / PAGE_SIZE;
        p < self.pages && self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_pages_once_and_ignores_what_is_outside_ram() {
        let mut s = PageSet::new(1 << 20);
        s.insert(0);
        s.insert(4096);
        s.insert(4096);
        s.insert(1 << 20);
        assert_eq!(s.len(), 2);
        assert!(s.contains(0) && s.contains(4096) && !s.contains(8192));
        assert!(!s.contains(1 << 20));
        s.remove(0);
        s.remove(0);
        assert_eq!(s.len(), 1);
        assert!(!s.contains(0));
    }
}
