//! Network faults the edge must survive, in the server → client direction: [`relay`] breaks the first connection
//! through it (cut after some bytes, or one byte flipped) and relays every later one faithfully; [`chaos`] breaks a
//! random share of its connections at random points and adds jitter.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use crate::rng::Rng;

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

/// Copies `from` → `to`, applying `fault`, each chunk delayed by up to `jitter` ms.
fn copy(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Option<Fault>,
    mut jitter: Option<(Rng, u64)>,
) {
    let mut buf = vec![0; 16 * 1024];
    let mut offset = 0;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        // One chunk in eight waits: delays vary without adding up over a long stream.
        if let Some((rng, ms)) = jitter.as_mut().filter(|(_, ms)| *ms > 0) {
            let r = rng.next_u64();
            if r % 8 == 0 {
                std::thread::sleep(std::time::Duration::from_micros(
                    (r >> 3) % (*ms * 1000 + 1),
                ));
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
}

/// A relay in front of `to` where each connection, with probability `rate`, is cut or has one byte corrupted at a
/// random point of its first `within` bytes from the server, and one chunk in eight from the server waits a random
/// 0..=`jitter_ms` ms. Connections to a server that is down are refused, as the server's would be.
pub fn chaos(
    to: SocketAddr,
    rate: f64,
    within: usize,
    jitter_ms: u64,
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
            let jitter = Rng::new(rng.next_u64());
            std::thread::spawn(move || copy(client, s2, None, None));
            std::thread::spawn(move || copy(server, c2, fault, Some((jitter, jitter_ms))));
        }
    });
    (addr, injected)
}
