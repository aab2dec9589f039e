//! A misbehaving HTTP/1.1 file server of our own, for the failure paths real servers never take.
//!
//! ```text
//! let server = FaultServer::start(&image_path, FaultPlan {
//!     drop_at: vec![size * 3 / 10, size * 7 / 10], // cut the connection once at each offset
//!     ..Default::default()
//! })?;
//! server.url("disk.img");        // "http://127.0.0.1:PORT/disk.img" (any path serves the file)
//! server.requests();             // every request: method, path, headers, status, bytes sent
//! server.body_bytes_sent();      // total body bytes sent, to count re-fetched bytes
//! ```
//!
//! Behaviour without faults: `GET`/`HEAD` of the one file at any path, `Content-Length`,
//! `Accept-Ranges: bytes`, an `ETag` and `Last-Modified`, `Range: bytes=a-[b]` → 206,
//! `If-Range` honoured (a mismatch sends the whole file with 200). Every response closes the
//! connection. Faults ([`FaultPlan`]) combine:
//! * `drop_at`: each offset cuts the connection once, the first time a response reaches it;
//! * `status`: every request is answered with this status and a short text body;
//! * `trickle`: the body goes out in chunks of `n` bytes with a pause between them;
//! * `stall_at`: the first response reaching this offset stops sending but keeps the
//!   connection open (later requests are served normally);
//! * `content_length_delta`: the announced `Content-Length` is off by this much (the real body
//!   is sent and the connection closed);
//! * `ignore_range`: `Range` is ignored (always 200 with the whole file);
//! * `redirect_to`: every request gets `302 Location: <redirect_to>`;
//! * `html_error`: every request gets `200 text/html` with an error page;
//! * `basic_auth`: requests without these credentials get 401.
//!
//! Runs on std threads, listens on 127.0.0.1 only, stops when dropped.
//!
//! [`FaultProxy`] is the same idea one layer down, for uploads: a TCP relay (TLS passes through
//! untouched) in front of a real server that cuts a connection once, either in the middle of
//! what the client sends or just as the answer comes back, and counts the bytes it forwarded:
//!
//! ```text
//! let relay = FaultProxy::start(upstream_port, ProxyFault { cut_request_at: Some(size / 2), ..Default::default() })?;
//! // point the client at https://127.0.0.1:{relay.port}; afterwards:
//! relay.bytes_up();    // client → server bytes over all connections (resume vs restart)
//! relay.cuts();        // faults injected so far
//! ```

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What to do wrong. `Default` is a well-behaved server.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Absolute file offsets at which the connection is cut, each once.
    pub drop_at: Vec<u64>,
    /// Answer every request with this status.
    pub status: Option<u16>,
    /// Send the body in chunks of `.0` bytes, sleeping `.1` between chunks.
    pub trickle: Option<(usize, Duration)>,
    /// Stop sending (but keep the connection) at this offset, once.
    pub stall_at: Option<u64>,
    /// Added to the true `Content-Length`.
    pub content_length_delta: i64,
    /// Ignore `Range` headers.
    pub ignore_range: bool,
    /// `302` to this location on every request.
    pub redirect_to: Option<String>,
    /// `200 text/html` error page on every request.
    pub html_error: bool,
    /// Require these basic-auth credentials.
    pub basic_auth: Option<(String, String)>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct RequestLog {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// Request target.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Status sent.
    pub status: u16,
    /// Body bytes actually written.
    pub body_bytes: u64,
}

impl RequestLog {
    /// First header value named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    file: PathBuf,
    len: u64,
    etag: String,
    plan: FaultPlan,
    drops_left: Mutex<Vec<u64>>,
    log: Mutex<Vec<RequestLog>>,
    body_bytes: AtomicU64,
    stop: AtomicBool,
    stalled: AtomicBool,
}

/// A running fault server; dropped → stopped.
pub struct FaultServer {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The port.
    pub port: u16,
    shared: Arc<Shared>,
}

/// How long a stalled response keeps its connection open at most.
const STALL_LIMIT: Duration = Duration::from_secs(300);
/// Chunk of file data per write when not trickling.
const CHUNK: usize = 64 * 1024;
/// Longest request head we accept (tests only send small requests).
const MAX_HEAD: usize = 64 * 1024;

impl FaultServer {
    /// Serve `file` with `plan`.
    pub fn start(file: &Path, plan: FaultPlan) -> io::Result<FaultServer> {
        let len = file.metadata()?.len();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mut drops = plan.drop_at.clone();
        drops.sort_unstable();
        let shared = Arc::new(Shared {
            file: file.to_path_buf(),
            len,
            etag: format!("\"cdi-{len:x}\""),
            plan,
            drops_left: Mutex::new(drops),
            log: Mutex::new(Vec::new()),
            body_bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn_shared = Arc::clone(&accept_shared);
                thread::spawn(move || {
                    let _ = handle(stream, &conn_shared);
                });
            }
        });
        Ok(FaultServer {
            base_url: format!("http://127.0.0.1:{port}"),
            port,
            shared,
        })
    }

    /// `base_url/path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path.trim_start_matches('/'))
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Total body bytes sent over all responses.
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }

    /// Size of the served file.
    pub fn file_len(&self) -> u64 {
        self.shared.len
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn handle(stream: TcpStream, s: &Shared) -> io::Result<()> {
    if s.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut head = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line.trim_end().to_string());
        if head.iter().map(String::len).sum::<usize>() > MAX_HEAD {
            return Ok(());
        }
    }
    let mut parts = head.first().map(|l| l.split(' ')).into_iter().flatten();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let headers: Vec<(String, String)> = head
        .iter()
        .skip(1)
        .filter_map(|h| h.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut entry = RequestLog {
        method: method.clone(),
        path,
        headers,
        status: 0,
        body_bytes: 0,
    };
    let result = respond(stream, s, &mut entry, &method);
    if let Ok(mut log) = s.log.lock() {
        log.push(entry);
    }
    result
}

fn simple(
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    extra: &str,
    body: &str,
) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

fn respond(
    mut stream: TcpStream,
    s: &Shared,
    entry: &mut RequestLog,
    method: &str,
) -> io::Result<()> {
    let plan = &s.plan;
    if let Some((user, pass)) = &plan.basic_auth {
        let expected = format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()));
        if entry.header("authorization") != Some(expected.as_str()) {
            entry.status = 401;
            return simple(
                &mut stream,
                401,
                "Unauthorized",
                "WWW-Authenticate: Basic realm=\"cdi\"\r\n",
                "unauthorized\n",
            );
        }
    }
    if let Some(location) = &plan.redirect_to {
        entry.status = 302;
        return simple(
            &mut stream,
            302,
            "Found",
            &format!("Location: {location}\r\n"),
            "",
        );
    }
    if let Some(status) = plan.status {
        entry.status = status;
        return simple(
            &mut stream,
            status,
            reason(status),
            "",
            "injected failure\n",
        );
    }
    if plan.html_error {
        entry.status = 200;
        return simple(
            &mut stream,
            200,
            "OK",
            "Content-Type: text/html\r\n",
            "<html><body><h1>Error</h1><p>Something went wrong</p></body></html>\n",
        );
    }
    // Range handling.
    let mut start = 0u64;
    let mut end = s.len; // exclusive
    let mut partial = false;
    let if_range_ok = entry
        .header("if-range")
        .is_none_or(|v| v == s.etag || v == LAST_MODIFIED);
    if let (Some(range), false, true) = (entry.header("range"), plan.ignore_range, if_range_ok)
        && let Some((a, b)) = range.strip_prefix("bytes=").and_then(|r| r.split_once('-'))
    {
        let a: Option<u64> = a.parse().ok();
        let b: Option<u64> = if b.is_empty() {
            Some(s.len.saturating_sub(1))
        } else {
            b.parse().ok()
        };
        match (a, b) {
            (Some(a), Some(b)) if a < s.len && a <= b => {
                start = a;
                end = (b + 1).min(s.len);
                partial = true;
            }
            _ => {
                entry.status = 416;
                return simple(
                    &mut stream,
                    416,
                    "Range Not Satisfiable",
                    &format!("Content-Range: bytes */{}\r\n", s.len),
                    "",
                );
            }
        }
    }
    let announced = ((end - start) as i64 + plan.content_length_delta).max(0);
    let status = if partial { 206 } else { 200 };
    entry.status = status;
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {announced}\r\nAccept-Ranges: {}\r\nETag: {}\r\n\
         Last-Modified: {LAST_MODIFIED}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
        reason(status),
        if plan.ignore_range { "none" } else { "bytes" },
        s.etag,
    );
    if partial {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            end - 1,
            s.len
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return Ok(());
    }
    let mut file = File::open(&s.file)?;
    file.seek(SeekFrom::Start(start))?;
    let chunk = plan.trickle.map_or(CHUNK, |(n, _)| n.max(1));
    let mut buf = vec![0u8; chunk];
    let mut pos = start;
    while pos < end {
        if s.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut want = (end - pos).min(chunk as u64);
        // Cut at the next pending drop point inside this response.
        let drop_point = s
            .drops_left
            .lock()
            .ok()
            .and_then(|d| d.iter().copied().find(|&d| d > pos && d <= end));
        if let Some(d) = drop_point {
            want = want.min(d - pos);
        }
        if let Some(st) = plan.stall_at
            && st >= pos
            && st < end
            && !s.stalled.load(Ordering::SeqCst)
        {
            want = want.min(st - pos);
            if want == 0 {
                s.stalled.store(true, Ordering::SeqCst);
                let mut waited = Duration::ZERO;
                while waited < STALL_LIMIT && !s.stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(100));
                    waited += Duration::from_millis(100);
                }
                return Ok(());
            }
        }
        let n = want as usize;
        file.read_exact(&mut buf[..n])?;
        stream.write_all(&buf[..n])?;
        pos += want;
        entry.body_bytes += want;
        s.body_bytes.fetch_add(want, Ordering::SeqCst);
        if drop_point == Some(pos) {
            if let Ok(mut d) = s.drops_left.lock() {
                d.retain(|&x| x != pos);
            }
            // Close mid-body: the client sees fewer bytes than Content-Length announced.
            stream.flush()?;
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        if let Some((_, pause)) = plan.trickle {
            thread::sleep(pause);
        }
    }
    stream.flush()
}

/// What a [`FaultProxy`] does wrong; each fault fires once, on the first connection that
/// reaches it. `Default` relays faithfully.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyFault {
    /// Cut the connection after forwarding this many client → server bytes of it.
    pub cut_request_at: Option<u64>,
    /// Once a connection has forwarded at least this many client → server bytes, swallow the
    /// next server → client bytes (the response) and cut it: the request arrived, its answer
    /// is lost.
    pub lose_response_after: Option<u64>,
}

struct RelayShared {
    upstream: u16,
    cut_request_at: Mutex<Option<u64>>,
    lose_response_after: Mutex<Option<u64>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    connections: AtomicU64,
    cuts: AtomicU64,
    stop: AtomicBool,
}

/// A running TCP relay on 127.0.0.1 in front of `127.0.0.1:upstream`; dropped → stopped.
pub struct FaultProxy {
    /// The port clients connect to.
    pub port: u16,
    shared: Arc<RelayShared>,
}

/// Relay buffer: large enough to keep up with loopback uploads.
const RELAY_CHUNK: usize = 64 * 1024;

impl FaultProxy {
    /// Relay connections on a fresh port to `127.0.0.1:upstream`, injecting `fault`.
    pub fn start(upstream: u16, fault: ProxyFault) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(RelayShared {
            upstream,
            cut_request_at: Mutex::new(fault.cut_request_at),
            lose_response_after: Mutex::new(fault.lose_response_after),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = stream else { continue };
                let conn_shared = Arc::clone(&accept_shared);
                thread::spawn(move || {
                    let _ = relay(client, &conn_shared);
                });
            }
        });
        Ok(FaultProxy { port, shared })
    }

    /// Client → server bytes forwarded over all connections.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Server → client bytes forwarded over all connections.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A forward proxy that only speaks `CONNECT` (what HTTPS clients send to `HTTPS_PROXY`): it
/// records each tunnel's `host:port`, then relays bytes to that port on 127.0.0.1, whatever the
/// host (tests never leave the machine). Dropped → stopped.
pub struct ConnectProxy {
    /// The port clients connect to.
    pub port: u16,
    tunnels: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl ConnectProxy {
    /// Listen on a fresh port on 127.0.0.1.
    pub fn start() -> io::Result<ConnectProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, st) = (Arc::clone(&tunnels), Arc::clone(&stop));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = stream else { continue };
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    let _ = tunnel(client, &t);
                });
            }
        });
        Ok(ConnectProxy {
            port,
            tunnels,
            stop,
        })
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `host:port` of every tunnel asked for so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn tunnel(client: TcpStream, tunnels: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        let mut c = client;
        return c.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
    };
    let target = target.to_string();
    // The rest of the request head.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let port: u16 = target
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad CONNECT target {target}")))?;
    if let Ok(mut g) = tunnels.lock() {
        g.push(target);
    }
    let server = TcpStream::connect(("127.0.0.1", port))?;
    let mut c = client.try_clone()?;
    c.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")?;
    // Bytes the client sent right behind the head are still in `reader`'s buffer.
    let pending = reader.buffer().to_vec();
    let (mut up_from, mut up_to) = (reader, server.try_clone()?);
    up_to.write_all(&pending)?;
    let up = thread::spawn(move || {
        let _ = io::copy(up_from.get_mut(), &mut up_to);
        let _ = up_to.shutdown(std::net::Shutdown::Write);
    });
    let (mut down_from, mut down_to) = (server, client);
    let _ = io::copy(&mut down_from, &mut down_to);
    let _ = down_to.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}

/// Take a one-shot fault: `Some(at)` the first time, `None` afterwards.
fn take_if(slot: &Mutex<Option<u64>>, pred: impl FnOnce(u64) -> bool) -> Option<u64> {
    let mut g = slot.lock().ok()?;
    match *g {
        Some(at) if pred(at) => g.take(),
        _ => None,
    }
}

fn relay(client: TcpStream, s: &Arc<RelayShared>) -> io::Result<()> {
    if s.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    s.connections.fetch_add(1, Ordering::SeqCst);
    let server = TcpStream::connect(("127.0.0.1", s.upstream))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Client → server bytes of this connection, read by the downward half.
    let up_count = Arc::new(AtomicU64::new(0));
    // Handles to cut both sides from either half.
    let ends = Arc::new((client.try_clone()?, server.try_clone()?));
    let cut = |ends: &(TcpStream, TcpStream)| {
        let _ = ends.0.shutdown(std::net::Shutdown::Both);
        let _ = ends.1.shutdown(std::net::Shutdown::Both);
    };

    let down = {
        let (mut from, mut to) = (server.try_clone()?, client.try_clone()?);
        let (s, up_count, ends) = (Arc::clone(s), Arc::clone(&up_count), Arc::clone(&ends));
        thread::spawn(move || {
            let mut buf = vec![0u8; RELAY_CHUNK];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let sent_up = up_count.load(Ordering::SeqCst);
                if take_if(&s.lose_response_after, |at| sent_up >= at).is_some() {
                    s.cuts.fetch_add(1, Ordering::SeqCst);
                    cut(&ends);
                    return;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                s.bytes_down.fetch_add(n as u64, Ordering::SeqCst);
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        })
    };

    let (mut from, mut to) = (client, server);
    let mut buf = vec![0u8; RELAY_CHUNK];
    let mut conn_up = 0u64;
    loop {
        let mut n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let cut_at = take_if(&s.cut_request_at, |at| conn_up + n as u64 >= at);
        if let Some(at) = cut_at {
            n = (at - conn_up) as usize;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        conn_up += n as u64;
        up_count.store(conn_up, Ordering::SeqCst);
        s.bytes_up.fetch_add(n as u64, Ordering::SeqCst);
        if cut_at.is_some() {
            let _ = to.flush();
            s.cuts.fetch_add(1, Ordering::SeqCst);
            cut(&ends);
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = down.join();
    Ok(())
}

/// Fixed `Last-Modified` (also accepted as an `If-Range` validator).
const LAST_MODIFIED: &str = "Wed, 21 Oct 2026 07:28:00 GMT";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Standard base64 (tests only need it for basic-auth headers).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(url: &str, extra: &[&str]) -> (String, Vec<u8>) {
        let out = std::process::Command::new("curl")
            .args(["-s", "-D", "/dev/stderr"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stderr).to_string(), out.stdout)
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }

    #[test]
    fn serves_ranges_and_drops_once() {
        if !crate::have("curl") {
            crate::skip("curl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let srv = FaultServer::start(
            &file,
            FaultPlan {
                drop_at: vec![100_000],
                ..Default::default()
            },
        )
        .unwrap();
        let (_, body) = get(&srv.url("x"), &[]);
        assert_eq!(
            body.len(),
            100_000,
            "first response is cut at the drop point"
        );
        let (head, body) = get(&srv.url("x"), &["-r", "100000-"]);
        assert!(head.starts_with("HTTP/1.1 206"), "{head}");
        assert_eq!(body, &data[100_000..]);
        assert_eq!(srv.body_bytes_sent(), 300_000);
        assert_eq!(srv.requests().len(), 2);
    }

    /// An upstream that reads each connection to its end, records the byte count and answers
    /// "ok".
    fn sink() -> (u16, Arc<Mutex<Vec<u64>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let log = Arc::clone(&log);
                thread::spawn(move || {
                    let mut n = 0u64;
                    let mut buf = [0u8; 8192];
                    while let Ok(k) = stream.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    log.lock().unwrap().push(n);
                    let _ = stream.write_all(b"ok");
                });
            }
        });
        (port, seen)
    }

    /// Send `len` bytes through `port`, half-close, read the answer.
    fn exchange(port: u16, len: usize) -> Vec<u8> {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = c.write_all(&vec![7u8; len]);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        answer
    }

    fn wait_for(seen: &Mutex<Vec<u64>>, n: usize) -> Vec<u64> {
        for _ in 0..200 {
            let v = seen.lock().unwrap().clone();
            if v.len() >= n {
                return v;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("upstream saw {:?}", seen.lock().unwrap());
    }

    #[test]
    fn relay_cuts_a_request_once_at_the_offset() {
        let (upstream, seen) = sink();
        let relay = FaultProxy::start(
            upstream,
            ProxyFault {
                cut_request_at: Some(30_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(exchange(relay.port, 100_000), b"", "cut: no answer");
        assert_eq!(wait_for(&seen, 1), vec![30_000]);
        assert_eq!(
            exchange(relay.port, 100_000),
            b"ok",
            "later connections pass"
        );
        assert_eq!(wait_for(&seen, 2), vec![30_000, 100_000]);
        assert_eq!(relay.cuts(), 1);
        assert_eq!(relay.connections(), 2);
        assert_eq!(relay.bytes_up(), 130_000);
    }

    #[test]
    fn relay_loses_the_answer_to_a_complete_request() {
        let (upstream, seen) = sink();
        let relay = FaultProxy::start(
            upstream,
            ProxyFault {
                lose_response_after: Some(5_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(exchange(relay.port, 1_000), b"ok", "below the threshold");
        assert_eq!(exchange(relay.port, 8_000), b"", "answer swallowed");
        assert_eq!(wait_for(&seen, 2), vec![1_000, 8_000], "request arrived");
        assert_eq!(exchange(relay.port, 8_000), b"ok", "only once");
        assert_eq!(relay.cuts(), 1);
        assert_eq!(relay.bytes_down(), 4);
    }

    #[test]
    fn ignores_range_and_injects_status() {
        if !crate::have("curl") {
            crate::skip("curl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![1u8; 1000]).unwrap();
        let srv = FaultServer::start(
            &file,
            FaultPlan {
                ignore_range: true,
                ..Default::default()
            },
        )
        .unwrap();
        let (head, body) = get(&srv.url("x"), &["-r", "10-"]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.len(), 1000);
        let srv = FaultServer::start(
            &file,
            FaultPlan {
                status: Some(503),
                ..Default::default()
            },
        )
        .unwrap();
        let (head, _) = get(&srv.url("x"), &[]);
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    }
}
