//! The protocol's encoders and decoders, frame by frame.
use super::*;
use crate::codec::Codec;
use std::io::Cursor;
use vm_memory::VolatileSlice;
use zerocopy::byteorder::little_endian::U64;

fn frames(list: &[(Kind, Vec<u8>)]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for (k, p) in list {
        w.send(*k, p).unwrap();
    }
    w.inner().clone()
}

fn batch(pages: &[(u64, Option<u8>)]) -> Vec<u8> {
    let mut b = PageBatch::default();
    let mut data = Vec::new();
    for (off, fill) in pages {
        b.push(*off, fill.is_none());
        if let Some(f) = fill {
            data.extend(std::iter::repeat_n(*f, PAGE));
        }
    }
    let mut p = b.head();
    p.extend(data);
    p
}

fn decode_pages(payload: &[u8], limit: u64) -> Result<Vec<PageRef<'_>>, ProtocolError> {
    match decode(Kind::Pages, payload)? {
        Frame::Pages { head, data } => head.pages(data, limit, Kind::Pages),
        f => panic!("{:?}", f.kind()),
    }
}

#[test]
fn headers_have_their_wire_sizes() {
    assert_eq!(HELLO_LEN, 16);
    assert_eq!(std::mem::size_of::<DataHelloWire>(), 16);
    assert_eq!(HEADER_LEN, 24);
    assert_eq!(std::mem::size_of::<CompressedHeader>(), 8);
    assert_eq!(std::mem::size_of::<RoundEndWire>(), 12);
    assert_eq!(std::mem::size_of::<ConfirmWire>(), 12);
    assert_eq!(ENTRY_LEN, 8);
}

#[test]
fn frames_round_trip() {
    let bytes = frames(&[
        (Kind::Config, b"{}".to_vec()),
        (Kind::Ready, vec![]),
        (Kind::Done, vec![]),
    ]);
    let mut r = FrameReader::new(Cursor::new(bytes));
    assert_eq!(r.recv().unwrap(), (Kind::Config, &b"{}"[..]));
    assert_eq!(r.recv().unwrap().0, Kind::Ready);
    assert_eq!(r.recv().unwrap().0, Kind::Done);
    assert!(matches!(r.recv(), Err(ProtocolError::Closed)));
}

#[test]
fn extents_merge_across_their_smallest_gaps() {
    let e = [(0, 10), (12, 20), (100, 110), (111, 120), (500, 510)];
    assert_eq!(coalesce(&e, 10), e.to_vec());
    assert_eq!(coalesce(&e, 3), vec![(0, 20), (100, 120), (500, 510)]);
    assert_eq!(coalesce(&e, 1), vec![(0, 510)]);
    let total = |v: &[(u64, u64)]| v.iter().map(|(s, e)| e - s).sum::<u64>();
    assert!(
        total(&coalesce(&e, 2)) >= total(&e),
        "merging only ever covers more"
    );
}

#[test]
fn every_kind_encodes_and_decodes_here() {
    let mut w = FrameWriter::new(Vec::new());
    let prep = Prepare {
        vm: migratable::VmConfig::new(64 << 20, 2),
        streams: 3,
        session: 0xfeed,
        name: Some("web-1".into()),
        origin: None,
        generation: None,
        host_cache: None,
        sections: vec![migratable::SectionId::new("clock", 1)],
        disks: Vec::new(),
        postcopy: false,
    };
    w.send_config(&prep).unwrap();
    w.send_extents(&[(0, 8192), (1 << 20, 2 << 20)]).unwrap();
    w.send_redirect(&Redirect { port: 7001 }).unwrap();
    w.send_round_end(RoundEnd {
        round: 7,
        pages: 1 << 40,
    })
    .unwrap();
    w.send_round_done(RoundEnd { round: 7, pages: 3 }).unwrap();
    let times = Confirmed {
        received_us: 1_500,
        loaded_us: 2_250,
        confirming_us: u32::MAX,
    };
    w.send_confirm(times).unwrap();
    w.send_cache_keys(&[[1; 16], [2; 16]]).unwrap();
    w.send_verified(&VerifyOutcome {
        ok: true,
        verifiable: true,
        detail: "VERIFY OK pages=3".into(),
        cpu_seconds: 0.5,
        resumed_ms: 0.25,
    })
    .unwrap();
    let mut b = PageBatch::default();
    b.push(4096, true);
    b.push(8192, false);
    w.send_compressed(Codec::Lz4, PAGE, &b.head(), b"zz")
        .unwrap();
    let mut r = FrameReader::new(Cursor::new(w.inner().clone()));
    match r.next_frame().unwrap() {
        Frame::Config(p) => {
            assert_eq!((p.streams, p.session, p.vm.vcpus), (3, 0xfeed, 2));
            assert_eq!(p.name.as_deref(), Some("web-1"));
        }
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::Extents(e) => assert_eq!(e, vec![(0, 8192), (1 << 20, 2 << 20)]),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::Redirect(d) => assert_eq!(d.port, 7001),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::RoundEnd(e) => assert_eq!(
            e,
            RoundEnd {
                round: 7,
                pages: 1 << 40
            }
        ),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::RoundDone(e) => assert_eq!(e, RoundEnd { round: 7, pages: 3 }),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::Confirm(c) => assert_eq!(c, times),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::CacheKeys(k) => assert_eq!(k.len(), 32),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::Verified(v) => assert!(v.ok && v.detail.contains("pages=3") && v.resumed_ms == 0.25),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::PagesCompressed(c) => {
            assert_eq!((c.codec, c.raw_len, c.data), (Codec::Lz4, PAGE, &b"zz"[..]));
            assert_eq!(c.head.entries().len(), 2);
            assert!(c.head.entries()[0].is_zero());
            assert_eq!(c.head.entries()[1].offset(), 8192);
        }
        f => panic!("{:?}", f.kind()),
    }
    // A RoundEnd of the wrong size is malformed, not a panic.
    let bad = frames(&[(Kind::RoundEnd, vec![0; 5])]);
    assert!(matches!(
        FrameReader::new(Cursor::new(bad)).next_frame(),
        Err(ProtocolError::Malformed {
            kind: Kind::RoundEnd,
            ..
        })
    ));
    // So is a Confirm without the destination's times, or with part of them.
    for len in [0, 11] {
        let bad = frames(&[(Kind::Confirm, vec![0; len])]);
        assert!(
            FrameReader::new(Cursor::new(bad)).next_frame().is_err(),
            "{len}"
        );
    }
    let bad = frames(&[(Kind::Config, b"{\"vm\":1}".to_vec())]);
    assert!(FrameReader::new(Cursor::new(bad)).next_frame().is_err());
    // Keys are whole or the frame is malformed.
    let bad = frames(&[(Kind::CacheKeys, vec![0; 17])]);
    assert!(FrameReader::new(Cursor::new(bad)).next_frame().is_err());
    // Extents are whole, and no more than the limit (merged to fit when sent).
    let bad = frames(&[(Kind::Extents, vec![0; 24])]);
    assert!(matches!(
        FrameReader::new(Cursor::new(bad)).next_frame(),
        Err(ProtocolError::Malformed {
            kind: Kind::Extents,
            ..
        })
    ));
    assert!(matches!(
        FrameWriter::new(Vec::new()).send(Kind::Extents, &vec![0; (MAX_EXTENTS + 1) * 16]),
        Err(ProtocolError::Oversized {
            kind: Kind::Extents,
            ..
        })
    ));
    let many: Vec<(u64, u64)> = (0..2 * MAX_EXTENTS as u64)
        .map(|i| (i * 8192, i * 8192 + 4096))
        .collect();
    let mut w = FrameWriter::new(Vec::new());
    w.send_extents(&many).unwrap();
    match FrameReader::new(Cursor::new(w.inner().clone())).next_frame() {
        Ok(Frame::Extents(e)) => assert_eq!(e.len(), MAX_EXTENTS),
        f => panic!("{f:?}"),
    }
}

#[test]
fn every_malformed_frame_is_refused() {
    let good = frames(&[(Kind::Config, b"{\"a\":1}".to_vec())]);
    let check = |bytes: Vec<u8>, want: &dyn Fn(&ProtocolError) -> bool, what: &str| {
        let e = FrameReader::new(Cursor::new(bytes)).recv().expect_err(what);
        assert!(want(&e), "{what}: got {e}");
    };
    // Truncated header, truncated payload.
    check(
        good[..10].to_vec(),
        &|e| matches!(e, ProtocolError::Truncated(_)),
        "short header",
    );
    check(
        good[..good.len() - 1].to_vec(),
        &|e| matches!(e, ProtocolError::Truncated(_)),
        "short payload",
    );
    // Unknown kind.
    let mut b = good.clone();
    b[0] = 77;
    check(
        b,
        &|e| matches!(e, ProtocolError::UnknownKind(77)),
        "unknown kind",
    );
    // Oversized length for the kind.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    check(
        b,
        &|e| matches!(e, ProtocolError::Oversized { .. }),
        "oversized",
    );
    let mut b = frames(&[(Kind::Ready, vec![])]);
    b[8] = 1;
    b.push(0);
    check(
        b,
        &|e| {
            matches!(
                e,
                ProtocolError::Oversized {
                    kind: Kind::Ready,
                    ..
                }
            )
        },
        "payload on empty kind",
    );
    // Flipped payload byte, flipped header byte, flipped checksum.
    for at in [HEADER_LEN + 2, 1, 20] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        check(
            b,
            &|e| matches!(e, ProtocolError::Checksum { .. }),
            "checksum",
        );
    }
    // Out of order: a frame with sequence 1 first.
    let two = frames(&[(Kind::Ready, vec![]), (Kind::Done, vec![])]);
    check(
        two[HEADER_LEN..].to_vec(),
        &|e| {
            matches!(
                e,
                ProtocolError::OutOfOrder {
                    expected: 0,
                    got: 1
                }
            )
        },
        "seq",
    );
    // An abort carries its reason, wherever it falls in the sequence.
    check(
        frames(&[(Kind::Abort, b"disk full".to_vec())]),
        &|e| matches!(e, ProtocolError::PeerAborted(r) if r == "disk full"),
        "abort",
    );
    let late = frames(&[
        (Kind::Ready, vec![]),
        (Kind::Abort, b"not committed".to_vec()),
    ]);
    check(
        late[HEADER_LEN..].to_vec(),
        &|e| matches!(e, ProtocolError::PeerAborted(r) if r == "not committed"),
        "abort out of sequence",
    );
}

#[test]
fn a_writer_refuses_to_send_an_oversized_frame() {
    let mut w = FrameWriter::new(Vec::new());
    assert!(matches!(
        w.send(Kind::RoundEnd, &[0; 13]),
        Err(ProtocolError::Oversized { .. })
    ));
    assert!(w.inner().is_empty(), "nothing went out");
}

/// A listener with no room answers a hello with Busy and why; a TLS listener answers a
/// plaintext hello with its notice: each reads as what it is, not as a broken handshake.
#[test]
fn busy_and_tls_required_answers_say_so() {
    let ours = Hello {
        version: VERSION,
        transport: Transport::Tcp,
        capabilities: 0,
    };
    let mut reply = Vec::new();
    answer_busy(
        &mut reply,
        "64 authenticated connections are opening at once",
    )
    .unwrap();
    match read_hello_reply(&mut Cursor::new(reply), &ours) {
        Err(ProtocolError::PeerBusy(why)) => assert!(why.starts_with("64 auth"), "{why}"),
        r => panic!("{r:?}"),
    }
    let notice = transport::mismatch::notice(transport::mismatch::TLS_REQUIRED);
    assert!(matches!(
        read_hello_reply(&mut Cursor::new(notice.to_vec()), &ours),
        Err(ProtocolError::TlsRequired)
    ));
    // A hostile answer claiming a long reason is refused from its length.
    let mut reply = Vec::new();
    answer_busy(&mut reply, "x").unwrap();
    reply[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(
        read_hello_reply(&mut Cursor::new(reply), &ours),
        Err(ProtocolError::Malformed { .. })
    ));
    // A Busy frame reads as the peer being busy.
    let mut w = FrameWriter::new(Vec::new());
    w.send_busy("host b already takes 4 incoming migrations")
        .unwrap();
    let bytes = w.inner().clone();
    let mut r = std::io::BufReader::new(Cursor::new(bytes));
    assert!(matches!(
        FrameReader::new(&mut r).next_frame(),
        Err(ProtocolError::PeerBusy(w)) if w.contains("4 incoming")
    ));
}

#[test]
fn handshake_accepts_ours_and_refuses_others() {
    let ours = Hello {
        version: VERSION,
        transport: Transport::Tcp,
        capabilities: 0,
    };
    let mut hello = Vec::new();
    write_hello(&mut hello, &ours).unwrap();
    let mut reply = Vec::new();
    assert_eq!(
        accept_hello(&mut Cursor::new(hello.clone()), &mut reply).unwrap(),
        ours
    );
    read_hello_reply(&mut Cursor::new(reply), &ours).unwrap();

    let mut v2 = hello.clone();
    v2[4] = 2;
    let mut reply = Vec::new();
    assert!(matches!(
        accept_hello(&mut Cursor::new(v2), &mut reply),
        Err(ProtocolError::Version { theirs: 2 })
    ));
    assert!(matches!(
        read_hello_reply(&mut Cursor::new(reply), &ours),
        Err(ProtocolError::Version { .. })
    ));

    let mut t = hello.clone();
    t[6] = 9;
    assert!(matches!(
        accept_hello(&mut Cursor::new(t), &mut Vec::new()),
        Err(ProtocolError::TransportUnsupported(9))
    ));
    assert!(matches!(
        accept_hello(
            &mut Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()),
            &mut Vec::new()
        ),
        Err(ProtocolError::BadMagic(_))
    ));
    assert!(matches!(
        accept_hello(&mut Cursor::new(hello[..7].to_vec()), &mut Vec::new()),
        Err(ProtocolError::Truncated(_))
    ));
}

#[test]
fn data_stream_hello_checks_session_and_index() {
    let mut b = Vec::new();
    write_data_hello(&mut b, 1, 0xabc).unwrap();
    assert_eq!(
        read_data_hello(&mut Cursor::new(b.clone()), 0xabc, 2).unwrap(),
        1
    );
    assert!(
        read_data_hello(&mut Cursor::new(b.clone()), 0xabd, 2).is_err(),
        "other session"
    );
    assert!(
        read_data_hello(&mut Cursor::new(b.clone()), 0xabc, 1).is_err(),
        "index out of range"
    );
    assert!(matches!(
        read_data_hello(&mut Cursor::new(b[..9].to_vec()), 0xabc, 2),
        Err(ProtocolError::Truncated(_))
    ));
    let mut h = Vec::new();
    write_hello(
        &mut h,
        &Hello {
            version: VERSION,
            transport: Transport::Tcp,
            capabilities: 0,
        },
    )
    .unwrap();
    assert!(matches!(
        read_data_hello(&mut Cursor::new(h), 0, 2),
        Err(ProtocolError::BadMagic(_))
    ));
}

#[test]
fn page_batches_round_trip_with_zero_pages() {
    let p = batch(&[(0, Some(7)), (4096, None), (1 << 20, Some(9))]);
    let pages = decode_pages(&p, 2 << 20).unwrap();
    assert_eq!(pages.len(), 3);
    assert_eq!(pages[0].offset, 0);
    assert!(pages[0].data.unwrap().iter().all(|&b| b == 7));
    assert_eq!(
        pages[1],
        PageRef {
            offset: 4096,
            data: None,
            base: None,
            replace: false,
            from: None
        }
    );
    assert!(pages[2].data.unwrap().iter().all(|&b| b == 9));
}

#[test]
fn extents_cut_into_chunks() {
    assert_eq!(
        chunks(&[(0, 5), (8, 10)], 2),
        vec![(0, 2), (2, 4), (4, 5), (8, 10)]
    );
    assert!(chunks(&[], 2).is_empty());
}

#[test]
fn delta_entries_carry_their_encoding_and_lies_are_refused() {
    let delta_of = |base: u64, enc: &[u8]| {
        let mut d = DeltaHead::new(base, enc.len()).as_bytes().to_vec();
        d.extend_from_slice(enc);
        d
    };
    let mut b = PageBatch::default();
    b.push(0, false);
    b.push_delta(4096);
    b.push(8192, true);
    let enc = [0u8, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut p = b.head();
    p.extend(std::iter::repeat_n(7u8, PAGE));
    p.extend(delta_of(42, &enc));
    let pages = decode_pages(&p, 1 << 20).unwrap();
    assert_eq!(
        (pages[1].offset, pages[1].base, pages[1].data),
        (4096, Some(42), Some(&enc[..]))
    );
    assert_eq!((pages[0].base, pages[2].data), (None, None));
    // Cut short, too long, bytes left over: refused.
    assert!(decode_pages(&p[..p.len() - 1], 1 << 20).is_err());
    let mut extra = p.clone();
    extra.push(0);
    assert!(decode_pages(&extra, 1 << 20).is_err());
    let mut long = b.head();
    long.extend(std::iter::repeat_n(7u8, PAGE));
    long.extend(delta_of(42, &vec![0u8; crate::delta::MAX_DELTA + 1]));
    assert!(decode_pages(&long, 1 << 20).is_err());
    // A delta cannot be a zero page or a reference too, nor travel as direct page data.
    for flags in [
        ZERO_FLAG | DELTA_FLAG,
        DELTA_FLAG | REF_FLAG,
        ZERO_FLAG | REF_FLAG,
    ] {
        let both = Entry(U64::new(4096 | flags));
        let mut h = U32::new(1).as_bytes().to_vec();
        h.extend_from_slice(both.as_bytes());
        assert!(decode(Kind::Pages, &h).is_err());
    }
    assert!(decode(Kind::PagesDirect, &b.head()).is_err());
    let mut r = PageBatch::default();
    r.push_ref(4096);
    assert!(decode(Kind::PagesDirect, &r.head()).is_err());
    // A reference carries where and what; it must name another page inside guest RAM.
    let mut p = r.head();
    p.extend_from_slice(RefHead::new(8192, [5; 32]).as_bytes());
    let pages = decode_pages(&p, 1 << 20).unwrap();
    assert_eq!(
        (pages[0].from, pages[0].data),
        (Some(RefTo::Page(8192)), Some(&[5u8; 32][..]))
    );
    let mut p = r.head();
    p.extend_from_slice(RefHead::host_cache([6; 32]).as_bytes());
    let pages = decode_pages(&p, 1 << 20).unwrap();
    assert_eq!(pages[0].from, Some(RefTo::HostCache));
    for bad in [4096u64, 1 << 20, 8193] {
        let mut p = r.head();
        p.extend_from_slice(RefHead::new(bad, [5; 32]).as_bytes());
        assert!(decode_pages(&p, 1 << 20).is_err(), "{bad:#x}");
    }
}

#[test]
fn direct_frames_carry_their_data_outside_the_payload() {
    let mut b = PageBatch::default();
    b.push(0, false);
    b.push(4096, true);
    b.push(8192, false);
    let head = b.head();
    let mut w = FrameWriter::new(Vec::new());
    w.send_direct_head(&head, 2 * PAGE).unwrap();
    let mut bytes = w.inner().clone();
    bytes.extend(std::iter::repeat_n(7u8, PAGE));
    bytes.extend(std::iter::repeat_n(9u8, PAGE));
    w.inner().clear();
    let mut br = std::io::BufReader::new(Cursor::new(bytes.clone()));
    let mut reader = FrameReader::new(&mut br);
    let (k, h) = reader.recv().unwrap();
    assert_eq!((k, h.to_vec()), (Kind::PagesDirect, head.clone()));
    // The next frame may not be read before the page data.
    assert!(reader.recv().is_err());
    let mut br = std::io::BufReader::new(Cursor::new(bytes.clone()));
    let mut reader = FrameReader::new(&mut br);
    reader.recv().unwrap();
    let file = tempfile::tempfile().unwrap();
    // Two runs, the second page first in the file.
    reader
        .read_direct(&file, &[(5 * 4096, PAGE), (4096, PAGE)])
        .unwrap();
    let mut p = vec![0u8; PAGE];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut p, 5 * 4096).unwrap();
    assert!(p.iter().all(|&x| x == 7));
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut p, 4096).unwrap();
    assert!(p.iter().all(|&x| x == 9));
    assert!(
        reader.read_direct(&file, &[(0, 1)]).is_err(),
        "no more data in this frame"
    );
    // The same data read into a mapping instead, in two pieces.
    let mut br = std::io::BufReader::new(Cursor::new(bytes.clone()));
    let mut reader = FrameReader::new(&mut br);
    reader.recv().unwrap();
    let mut m = vec![0u8; 2 * PAGE];
    // SAFETY: `m` outlives the slice and is not touched otherwise while it lives.
    let dst = unsafe { VolatileSlice::new(m.as_mut_ptr(), m.len()) };
    reader
        .read_direct_mapped(&dst.subslice(0, PAGE).unwrap())
        .unwrap();
    reader
        .read_direct_mapped(&dst.subslice(PAGE, PAGE).unwrap())
        .unwrap();
    assert!(
        reader
            .read_direct_mapped(&dst.subslice(0, 1).unwrap())
            .is_err(),
        "no more data in this frame"
    );
    assert!(m[..PAGE].iter().all(|&x| x == 7) && m[PAGE..].iter().all(|&x| x == 9));
    // A flipped entry fails the checksum; a short stream is truncated.
    let mut bad = bytes.clone();
    bad[HEADER_LEN + 5] ^= 1;
    let mut br = std::io::BufReader::new(Cursor::new(bad));
    assert!(matches!(
        FrameReader::new(&mut br).recv(),
        Err(ProtocolError::Checksum { .. })
    ));
    let mut short = std::io::BufReader::new(Cursor::new(bytes[..bytes.len() - 10].to_vec()));
    let mut fr = FrameReader::new(&mut short);
    fr.recv().unwrap();
    assert!(matches!(
        fr.read_direct(&tempfile::tempfile().unwrap(), &[(0, 2 * PAGE)]),
        Err(ProtocolError::Truncated(_))
    ));
}

#[test]
fn compressed_batches_split_and_refuse_lies() {
    let head = {
        let mut b = PageBatch::default();
        b.push(0, false);
        b.push(4096, true);
        b.head()
    };
    let frame = |codec: u8, raw: u32| {
        let mut p = vec![codec, 0, 0, 0];
        p.extend_from_slice(&raw.to_le_bytes());
        p.extend_from_slice(&head);
        p.extend_from_slice(b"compressed bytes");
        p
    };
    let ok = frame(1, 4096);
    let b = decode_compressed(&ok).unwrap();
    assert_eq!(
        (b.raw_len, b.head.entries().len(), b.data),
        (4096, 2, &b"compressed bytes"[..])
    );
    // A raw length that does not match the data pages (a decompression bomb, say).
    assert!(decode_compressed(&frame(1, 1 << 30)).is_err());
    assert!(decode_compressed(&frame(1, 8192)).is_err());
    assert!(decode_compressed(&frame(7, 4096)).is_err(), "unknown codec");
    assert!(decode_compressed(&ok[..6]).is_err(), "short header");
}

#[test]
fn malformed_page_batches_are_refused() {
    let good = batch(&[(0, Some(1)), (8192, None)]);
    let bad = |p: &[u8], limit: u64| decode_pages(p, limit).is_err();
    assert!(bad(&good[..2], 1 << 20), "short count");
    assert!(bad(&good[..good.len() - 1], 1 << 20), "short data");
    let mut extra = good.clone();
    extra.push(0);
    assert!(bad(&extra, 1 << 20), "trailing bytes");
    assert!(bad(&good, 4096), "offset beyond RAM");
    let mut flags = good.clone();
    flags[4] |= 0x2;
    assert!(bad(&flags, 1 << 20), "unknown flag bits");
    let mut many = good.clone();
    many[..4].copy_from_slice(&(MAX_BATCH_PAGES as u32 + 1).to_le_bytes());
    assert!(bad(&many, 1 << 20), "too many pages");
    let mut lie = good.clone();
    lie[..4].copy_from_slice(&3u32.to_le_bytes());
    assert!(bad(&lie, 1 << 20), "count larger than the table");
}

#[test]
fn a_remade_links_resume_names_the_pages_still_owed_and_the_verdict_follows_done() {
    let mut owed = Owed::new(1 << 20);
    owed.mark(8192);
    let mut w = FrameWriter::new(Vec::new());
    w.send_resume(&owed).unwrap();
    w.send_postcopy_done(&PostcopyStats {
        recoveries: 1,
        ..Default::default()
    })
    .unwrap();
    w.send_verified(&VerifyOutcome {
        ok: true,
        detail: "VERIFY OK".into(),
        verifiable: true,
        cpu_seconds: 0.0,
        resumed_ms: 0.0,
    })
    .unwrap();
    assert_eq!(w.seq(), 3);
    let bytes = w.inner().clone();
    let mut r = FrameReader::new(Cursor::new(bytes));
    match r.next_frame().unwrap() {
        Frame::PostcopyResume(o) => assert_eq!(o, owed),
        f => panic!("{:?}", f.kind()),
    }
    match r.next_frame().unwrap() {
        Frame::PostcopyDone(s) => assert_eq!(s.recoveries, 1),
        f => panic!("{:?}", f.kind()),
    }
    assert!(matches!(r.next_frame().unwrap(), Frame::Verified(_)));
    // A resume's bitmap is checked as a Postcopy frame's is.
    let mut bad = owed.encode();
    bad[8] = 7;
    assert!(decode(Kind::PostcopyResume, &bad).is_err());
}

#[test]
fn a_probe_report_round_trips_and_a_wrong_or_short_one_is_an_error() {
    use std::time::Duration;
    let report = ProbeReport {
        bytes: 123_456,
        wall: Duration::from_millis(1000),
        times: sched::ThreadTimes {
            on_cpu: Duration::from_millis(300),
            waiting: Duration::from_millis(600),
        },
    };
    let mut b = Vec::new();
    write_probe_report(&mut b, &report).unwrap();
    let got = read_probe_report(&mut Cursor::new(&b)).unwrap();
    assert_eq!(got, report);
    assert!((got.runnable_share() - 0.9).abs() < 1e-9);
    // Times beyond the wall time are cut to it.
    let mut long = b.clone();
    long[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let got = read_probe_report(&mut Cursor::new(&long)).unwrap();
    assert_eq!(got.times.on_cpu, got.wall);
    let mut wrong = b.clone();
    wrong[0] = b'X';
    assert!(matches!(
        read_probe_report(&mut Cursor::new(&wrong)),
        Err(ProtocolError::BadMagic(_))
    ));
    assert!(read_probe_report(&mut Cursor::new(&b[..20])).is_err());
}
