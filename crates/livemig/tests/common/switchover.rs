//! Proxies that break a switchover on purpose, for the tests of what settles it.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use host::HostClient;
use serde_json::Value;

/// What the proxy in front of a receiver does at switchover.
#[derive(Clone, Copy, PartialEq)]
pub enum Switchover {
    /// Forwards everything but the destination's Confirm and what follows: the VM runs there
    /// and the source never hears it.
    LoseConfirm,
    /// Kills the receiver when the source's State arrives: the VM never runs there, and the
    /// source hears nothing either.
    KillAtState,
}

/// Reads one frame (24-byte header and its payload).
fn read_frame(r: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 24];
    r.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut frame = h.to_vec();
    frame.resize(24 + len, 0);
    r.read_exact(&mut frame[24..]).ok()?;
    Some((h[0], frame))
}

/// A proxy for one migration to B's agent at `agent_port`: it passes the source's hello and
/// Config on, and answers the agent's Redirect with one to a second proxy in front of the
/// receiver, which misbehaves as `mode` says.
pub fn redirecting_proxy(agent_port: u16, b_sock: std::path::PathBuf, mode: Switchover) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut src, _)) = l.accept() else { return };
        let mut dst = TcpStream::connect(("127.0.0.1", agent_port)).unwrap();
        let mut hello = [0u8; 16];
        src.read_exact(&mut hello).unwrap();
        dst.write_all(&hello).unwrap();
        dst.read_exact(&mut hello).unwrap();
        src.write_all(&hello).unwrap();
        let (_, config) = read_frame(&mut src).unwrap();
        dst.write_all(&config).unwrap();
        let (kind, redirect) = read_frame(&mut dst).unwrap();
        assert_eq!(kind, 12, "the agent redirects");
        let to: Value = serde_json::from_slice(&redirect[24..]).unwrap();
        let p2 = switchover_proxy(to["port"].as_u64().unwrap() as u16, b_sock, mode);
        migration::protocol::FrameWriter::new(&mut src)
            .send_redirect(&migration::protocol::Redirect { port: p2 })
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    port
}

fn switchover_proxy(receiver_port: u16, b_sock: std::path::PathBuf, mode: Switchover) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut src, _)) = l.accept() else { return };
        let mut dst = TcpStream::connect(("127.0.0.1", receiver_port)).unwrap();
        let (mut src2, mut dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut hello = [0u8; 16];
            dst2.read_exact(&mut hello).unwrap();
            src2.write_all(&hello).unwrap();
            while let Some((kind, f)) = read_frame(&mut dst2) {
                if kind == 7 {
                    return std::thread::sleep(Duration::from_secs(60));
                }
                src2.write_all(&f).unwrap();
            }
        });
        let mut hello = [0u8; 16];
        src.read_exact(&mut hello).unwrap();
        dst.write_all(&hello).unwrap();
        while let Some((kind, f)) = read_frame(&mut src) {
            if kind == 5 && mode == Switchover::KillAtState {
                let receiver = HostClient::new(&b_sock)
                    .list()
                    .unwrap()
                    .into_iter()
                    .find(|v| v.state == "incoming")
                    .unwrap();
                Command::new("kill")
                    .args(["-9", &receiver.pid.to_string()])
                    .status()
                    .unwrap();
                return std::thread::sleep(Duration::from_secs(60));
            }
            if dst.write_all(&f).is_err() {
                return;
            }
        }
    });
    port
}
