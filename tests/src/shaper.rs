//! An in-process link emulator: a TCP relay on 127.0.0.1 that delays every byte by a one-way latency and paces each
//! direction to a bit rate (a token bucket with no burst), as a shaped link would.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A link: bits per second each way, and one-way delay (RTT / 2).
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub bits_per_s: f64,
    pub one_way: Duration,
}

impl Link {
    pub fn describe(&self) -> String {
        format!(
            "{:.0} Mb/s, {:.0} ms RTT (in-process shaper)",
            self.bits_per_s / 1e6,
            2.0 * self.one_way.as_secs_f64() * 1e3
        )
    }
}

/// Starts relaying connections on a new local port to `to` through `link`; returns the port's address.
pub fn shaped_relay(to: SocketAddr, link: Link) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone(), server.try_clone());
            if let (Ok(c2), Ok(s2)) = (c2, s2) {
                std::thread::spawn(move || pace(client, s2, link));
                std::thread::spawn(move || pace(server, c2, link));
            }
        }
    });
    addr
}

/// Copies `from` → `to`: each chunk leaves `one_way` after it arrived, and no faster than the bit rate.
fn pace(mut from: TcpStream, mut to: TcpStream, link: Link) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    // The reader stamps arrivals; the writer releases them on schedule, so reading never waits on pacing.
    let writer = std::thread::spawn(move || {
        let mut free_at = Instant::now();
        for (arrived, chunk) in rx {
            let start = free_at.max(arrived + link.one_way);
            let done = start + Duration::from_secs_f64(chunk.len() as f64 * 8.0 / link.bits_per_s);
            let now = Instant::now();
            if done > now {
                std::thread::sleep(done - now);
            }
            free_at = done;
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
