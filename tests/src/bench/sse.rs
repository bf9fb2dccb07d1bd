//! A streaming `POST /v1/chat/completions` read as it arrives, for the cloud-only baseline's time to first token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What one streamed answer cost, from before connecting.
pub struct Streamed {
    pub ttft: Duration,
    pub total: Duration,
    pub completion_tokens: usize,
}

/// Sends `body` (a streaming request asking for usage) and reads the server-sent events until `[DONE]`.
pub fn stream_chat(
    addr: SocketAddr,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Streamed, String> {
    let t0 = Instant::now();
    let body = body.to_string();
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let read_line = |r: &mut BufReader<TcpStream>, line: &mut String| -> Result<(), String> {
        line.clear();
        match r.read_line(line) {
            Ok(0) => Err("the connection closed early".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    read_line(&mut r, &mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(format!("{} {}", line.trim(), rest.trim()));
    }
    loop {
        read_line(&mut r, &mut line)?;
        if line == "\r\n" {
            break;
        }
    }
    // The body is chunked; events may span chunks, so de-chunk into `pending` and take whole lines from it.
    let (mut pending, mut ttft, mut tokens) = (Vec::<u8>::new(), None, None);
    loop {
        read_line(&mut r, &mut line)?;
        let n = usize::from_str_radix(line.trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        if n == 0 {
            return Err("the stream ended without [DONE]".into());
        }
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk).map_err(|e| format!("read: {e}"))?;
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let l: Vec<u8> = pending.drain(..=end).collect();
            let Some(data) = std::str::from_utf8(&l)
                .ok()
                .and_then(|l| l.trim().strip_prefix("data:"))
            else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(Streamed {
                    ttft: ttft.ok_or("no token came")?,
                    total: t0.elapsed(),
                    completion_tokens: tokens.ok_or("no usage chunk came")?,
                });
            }
            let v: serde_json::Value =
                serde_json::from_str(data).map_err(|e| format!("bad event {data}: {e}"))?;
            if let Some(e) = v.get("error") {
                return Err(format!("the cloud failed: {e}"));
            }
            if ttft.is_none()
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            {
                ttft = Some(t0.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
            }
        }
    }
}
