//! A TCP relay that breaks the first connection through it — cut after some bytes, or one byte flipped — in the
//! server → client direction, and relays every later connection faithfully: a network fault the edge must survive.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

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
            std::thread::spawn(move || copy(client, s2, None));
            std::thread::spawn(move || copy(server, c2, (i == 0).then_some(fault)));
        }
    });
    addr
}

fn copy(mut from: TcpStream, mut to: TcpStream, fault: Option<Fault>) {
    let mut buf = vec![0; 16 * 1024];
    let mut offset = 0;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
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
