//! Network faults the edge must survive, in the server → client direction: [`relay`] breaks the first connection
//! through it (cut after some bytes, or one byte flipped) and relays every later one faithfully; [`chaos`] breaks a
//! random share of its connections at random points and adds jitter and packet loss.
//!
//! Loss is emulated as TCP delivers it to the application: a lost segment is retransmitted, so the bytes behind it
//! arrive one retransmission timeout late ([`RTO`]). (This machine's kernel has no `sch_netem` to drop real packets.)

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use crate::rng::Rng;

/// Linux's minimum retransmission timeout: what one lost segment costs the stream behind it.
pub const RTO: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The connection ends after this many bytes from the server.
    Cut { after: usize },
    /// The server's byte at this offset arrives inverted.
    Corrupt { at: usize },
}

/// Starts the relay in front of `to`; returns its address.
pub fn relay(to: SocketAddr, fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for (i, client) in listener.incoming().flatten().enumerate() {
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || copy(client, s2, None, None));
            std::thread::spawn(move || copy(server, c2, (i == 0).then_some(fault), None));
        }
    });
    addr
}

/// Delays on a [`chaos`] connection.
struct Noise {
    rng: Rng,
    jitter_ms: u64,
    /// Probability that a chunk was "lost" and waits an [`RTO`].
    loss: f64,
    injected: Arc<Injected>,
}

/// Copies `from` → `to`, applying `fault` and `noise`.
fn copy(mut from: TcpStream, mut to: TcpStream, fault: Option<Fault>, mut noise: Option<Noise>) {
    let mut buf = vec![0; 16 * 1024];
    let mut offset = 0;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        if let Some(noise) = noise.as_mut() {
            let r = noise.rng.next_u64();
            // One chunk in eight waits: delays vary without adding up over a long stream.
            if noise.jitter_ms > 0 && r % 8 == 0 {
                std::thread::sleep(std::time::Duration::from_micros(
                    (r >> 3) % (noise.jitter_ms * 1000 + 1),
                ));
            }
            if noise.rng.unit() < noise.loss {
                noise.injected.losses.fetch_add(1, Relaxed);
                std::thread::sleep(RTO);
            }
        }
        let chunk = &mut buf[..n];
        let end = offset + n;
        match fault {
            Some(Fault::Cut { after }) if end >= after => {
                let _ = to.write_all(&chunk[..after - offset]);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Corrupt { at }) if (offset..end).contains(&at) => {
                chunk[at - offset] ^= 0xff
            }
            _ => {}
        }
        offset = end;
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Faults injected by a [`chaos`] relay, counted.
#[derive(Debug, Default)]
pub struct Injected {
    pub connections: AtomicUsize,
    pub cuts: AtomicUsize,
    pub corruptions: AtomicUsize,
    /// Chunks held back one [`RTO`] as if a segment of theirs was lost.
    pub losses: AtomicUsize,
}

/// A relay in front of `to` where each connection, with probability `rate`, is cut or has one byte corrupted at a
/// random point of its first `within` bytes from the server; one chunk in eight from the server waits a random
/// 0..=`jitter_ms` ms, and each is lost with probability `loss` (see [`RTO`]). Connections to a server that is down
/// are refused, as the server's would be.
pub fn chaos(
    to: SocketAddr,
    rate: f64,
    within: usize,
    jitter_ms: u64,
    loss: f64,
    seed: u64,
) -> (SocketAddr, Arc<Injected>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let injected = Arc::new(Injected::default());
    let counts = injected.clone();
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        for client in listener.incoming().flatten() {
            counts.connections.fetch_add(1, Relaxed);
            let Ok(server) = TcpStream::connect(to) else {
                continue; // dropping `client` refuses it
            };
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            let fault = if rng.unit() < rate {
                let at = (rng.unit() * within as f64) as usize;
                if rng.unit() < 0.5 {
                    counts.cuts.fetch_add(1, Relaxed);
                    Some(Fault::Cut { after: at })
                } else {
                    counts.corruptions.fetch_add(1, Relaxed);
                    Some(Fault::Corrupt { at })
                }
            } else {
                None
            };
            let noise = Noise {
                rng: Rng::new(rng.next_u64()),
                jitter_ms,
                loss,
                injected: counts.clone(),
            };
            std::thread::spawn(move || copy(client, s2, None, None));
            std::thread::spawn(move || copy(server, c2, fault, Some(noise)));
        }
    });
    (addr, injected)
}
