//! Privacy checks: a TCP relay that records every byte an edge sends, a WebSocket frame parser that unmasks them,
//! and the assertion that none of them carries the user's text or token ids.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use tandem_common::engine::Engine;

pub struct Relay {
    pub addr: SocketAddr,
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

pub fn relay(to: SocketAddr) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let record = sent.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let server = TcpStream::connect(to).unwrap();
            let conn = record.lock().unwrap().len();
            record.lock().unwrap().push(Vec::new());
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let rec = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0; 65536];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    rec.lock().unwrap()[conn].extend_from_slice(&buf[..n]);
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Relay { addr, sent }
}

/// The HTTP upgrade request, then every WebSocket payload unmasked, of one client→server byte stream.
pub fn unmask(stream: &[u8]) -> Vec<u8> {
    let head = stream
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP upgrade request")
        + 4;
    let mut out = stream[..head].to_vec();
    let mut i = head;
    while i + 2 <= stream.len() {
        let masked = stream[i + 1] & 0x80 != 0;
        let mut len = (stream[i + 1] & 0x7f) as usize;
        i += 2;
        if len == 126 {
            len = u16::from_be_bytes([stream[i], stream[i + 1]]) as usize;
            i += 2;
        } else if len == 127 {
            len = u64::from_be_bytes(stream[i..i + 8].try_into().unwrap()) as usize;
            i += 8;
        }
        assert!(masked, "client frames are masked");
        let key = [stream[i], stream[i + 1], stream[i + 2], stream[i + 3]];
        i += 4;
        let end = (i + len).min(stream.len());
        out.extend(
            stream[i..end]
                .iter()
                .enumerate()
                .map(|(j, b)| b ^ key[j % 4]),
        );
        i = end;
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts `sent` holds no word of `secret` (five letters or more) and none of its token ids, as little-endian
/// u32s (any three in a row, or all) or as postcard varints.
pub fn assert_holds_no_user_data(sent: &[u8], secret: &str, e: &Engine) {
    for word in secret.split_whitespace().filter(|w| w.len() >= 5) {
        assert!(
            !contains(sent, word.as_bytes()),
            "user text {word:?} reached the cloud"
        );
    }
    let user_ids = e.tokenizer.encode(secret).unwrap();
    let le: Vec<u8> = user_ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    let varint = postcard::to_allocvec(&user_ids).unwrap();
    for w in user_ids.windows(3) {
        let le3: Vec<u8> = w.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert!(
            !contains(sent, &le3),
            "user token ids {w:?} (u32) reached the cloud"
        );
    }
    assert!(!contains(sent, &le));
    assert!(
        !contains(sent, &varint[1..]),
        "user token ids (varint) reached the cloud"
    );
}
