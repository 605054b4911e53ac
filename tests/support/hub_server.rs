//! A small Hugging Face hub for tests: HTTP/1.1 on 127.0.0.1, one thread, never the network.
//! It stops when dropped, or by itself after a few minutes if a test forgets.
//!
//! It speaks the part of the hub's API that corda uses:
//! - `GET /api/{models|datasets}/{id}/revision/{rev}`: `{"sha", "siblings", "gated"}`;
//! - `HEAD|GET /{id}/resolve/{rev}/{file}` (datasets under `/datasets/`), with `ETag`,
//!   `X-Repo-Commit`, `Content-Length`, and `Range` / `Content-Range` on GET. Large files
//!   (`.safetensors`, `.parquet`) behave like LFS files: a 302 to `/cdn/{sha256}` carrying
//!   `X-Linked-Etag` (their sha256) and `X-Linked-Size`;
//! - errors with `X-Error-Code` as the hub sends them: `RepoNotFound` (401 without a token),
//!   `RevisionNotFound`, `EntryNotFound`, `GatedRepo` (401 without a token, 403 with a wrong one).
//!
//! Included with `#[path]` by the tests of several crates; not every test uses every item.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::Digest;

/// One revision of a repo: its name(s), commit and files.
#[derive(Clone, Debug)]
pub struct Revision {
    pub names: Vec<String>,
    pub sha: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct FakeRepo {
    /// `models` or `datasets`.
    pub kind: &'static str,
    pub id: String,
    pub revisions: Vec<Revision>,
    /// Gated: downloads need exactly this token.
    pub token: Option<String>,
    /// Former ids: requests to them get a relative 307 to this id, as the hub answers for
    /// renamed repos (`nq_open` → `google-research-datasets/nq_open`).
    pub old_ids: Vec<String>,
}

impl FakeRepo {
    pub fn new(kind: &'static str, id: &str) -> Self {
        FakeRepo {
            kind,
            id: id.to_string(),
            revisions: Vec::new(),
            token: None,
            old_ids: Vec::new(),
        }
    }

    /// Adds a revision called `name` whose commit sha is derived from `name`.
    pub fn revision(mut self, name: &str, files: BTreeMap<String, Vec<u8>>) -> Self {
        let sha = hex(&sha2::Sha256::digest(format!("{}@{name}", self.id)))[..40].to_string();
        self.revisions.push(Revision {
            names: vec![name.to_string()],
            sha,
            files,
        });
        self
    }

    pub fn renamed_from(mut self, old_id: &str) -> Self {
        self.old_ids.push(old_id.to_string());
        self
    }

    pub fn gated(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    pub fn sha(&self, name: &str) -> String {
        self.find(name).expect("revision").sha.clone()
    }

    fn find(&self, rev: &str) -> Option<&Revision> {
        self.revisions
            .iter()
            .find(|r| r.sha == rev || r.names.iter().any(|n| n == rev))
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    /// Files (by name) whose next GET body stops half-way.
    cut_next: HashSet<String>,
    /// Files (by name) whose next GET body has one byte flipped.
    corrupt_next: HashSet<String>,
    seen: Vec<Seen>,
}

pub struct HubServer {
    pub endpoint: String,
    /// The "CDN" LFS files redirect to: another port, so another origin (tokens stay on the hub).
    pub cdn: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cdn_listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        cdn_listener.set_nonblocking(true).unwrap();
        let cdn = format!("http://{}", cdn_listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, cdn) = (state.clone(), stop.clone(), cdn.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let mut idle = true;
                    for l in [&listener, &cdn_listener] {
                        if let Ok((stream, _)) = l.accept() {
                            idle = false;
                            let _ = serve(stream, &state, &cdn);
                        }
                    }
                    if idle {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
        };
        HubServer {
            endpoint,
            cdn,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The next GET of `file` sends half its body, then closes the connection.
    pub fn cut_next(&self, file: &str) {
        self.state.lock().unwrap().cut_next.insert(file.to_string());
    }

    /// The next GET of `file` sends the full length with one byte changed.
    pub fn corrupt_next(&self, file: &str) {
        self.state
            .lock()
            .unwrap()
            .corrupt_next
            .insert(file.to_string());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.state.lock().unwrap().seen.clear();
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `program` pointed at this hub with `home` as `HF_HOME` (so the cache is `home/hub`), and
/// none of the user's hub settings (token, cache, offline switch).
pub fn hub_command(
    program: &str,
    server: &HubServer,
    home: &std::path::Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    for var in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HOME", home);
    cmd
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `bytes` in hex: an LFS file's etag.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".parquet")
}

fn unquote(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close (a cut connection).
    cut_at: Option<usize>,
}

impl Reply {
    fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn error(status: u16, code: &str, message: &str) -> Self {
        Reply::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, cdn: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut st = state.lock().unwrap();
    let reply = route(&mut st, &method, &target, &headers, cdn);
    st.seen.push(Seen {
        method: method.clone(),
        path: target.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
        status: reply.status,
    });
    drop(st);
    let mut out = stream;
    let reason = match reply.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    let has_length = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let n = reply.cut_at.unwrap_or(reply.body.len());
        out.write_all(&reply.body[..n])?;
    }
    out.flush()?;
    let _ = out.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn route(
    st: &mut State,
    method: &str,
    target: &str,
    headers: &BTreeMap<String, String>,
    cdn: &str,
) -> Reply {
    let auth = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_string);
    let path = target.split('?').next().unwrap_or_default();
    if let Some(hash) = path.strip_prefix("/cdn/") {
        // Content-addressed storage: any repo's LFS file with this sha256.
        let found = st.repos.iter().find_map(|r| {
            r.revisions.iter().find_map(|rev| {
                rev.files
                    .iter()
                    .find(|(_, b)| sha256_hex(b) == hash)
                    .map(|(name, b)| (name.clone(), b.clone()))
            })
        });
        return match found {
            Some((name, bytes)) => body_reply(st, method, &name, bytes, headers, None),
            None => Reply::new(404),
        };
    }
    if let Some(rest) = path.strip_prefix("/api/") {
        let (kind, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let Some((id, rev)) = rest.rsplit_once("/revision/") else {
            return Reply::new(404);
        };
        if let Some(new_id) = renamed(st, kind, &unquote(id)) {
            return Reply::new(307)
                .header("Location", format!("/api/{kind}/{new_id}/revision/{rev}"));
        }
        let (id, rev) = (unquote(id), unquote(rev));
        let Some(repo) = st.repos.iter().find(|r| r.kind == kind && r.id == id) else {
            return repo_not_found(auth.is_some());
        };
        let Some(revision) = repo.find(&rev) else {
            return Reply::error(404, "RevisionNotFound", "Invalid rev id");
        };
        let siblings: Vec<String> = revision
            .files
            .keys()
            .map(|f| format!("{{\"rfilename\": \"{f}\"}}"))
            .collect();
        let gated = if repo.token.is_some() {
            "\"manual\""
        } else {
            "false"
        };
        let mut reply = Reply::new(200).header("Content-Type", "application/json");
        reply.body = format!(
            "{{\"id\": \"{}\", \"sha\": \"{}\", \"gated\": {gated}, \"siblings\": [{}]}}",
            repo.id,
            revision.sha,
            siblings.join(", ")
        )
        .into_bytes();
        return reply;
    }
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(rest) => ("datasets", rest),
        None => ("models", path.trim_start_matches('/')),
    };
    let Some((id, rest)) = rest.split_once("/resolve/") else {
        return Reply::new(404);
    };
    if let Some(new_id) = renamed(st, kind, &unquote(id)) {
        let prefix = if kind == "datasets" { "/datasets" } else { "" };
        return Reply::new(307).header("Location", format!("{prefix}/{new_id}/resolve/{rest}"));
    }
    let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
    let (id, rev, file) = (unquote(id), unquote(rev), unquote(file));
    let Some(repo) = st
        .repos
        .iter()
        .find(|r| r.kind == kind && r.id == id)
        .cloned()
    else {
        return repo_not_found(auth.is_some());
    };
    if let Some(token) = &repo.token {
        match &auth {
            None => {
                return Reply::error(
                    401,
                    "GatedRepo",
                    "Access to this model is restricted. You must have access to it and be authenticated to access it.",
                )
            }
            Some(t) if t != token => {
                return Reply::error(
                    403,
                    "GatedRepo",
                    "Access to this model is restricted and you are not in the authorized list.",
                )
            }
            Some(_) => {}
        }
    }
    let Some(revision) = repo.find(&rev) else {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let Some(bytes) = revision.files.get(&file).cloned() else {
        return Reply::error(404, "EntryNotFound", "Entry not found");
    };
    if is_lfs(&file) {
        let hash = sha256_hex(&bytes);
        return Reply::new(302)
            .header("Location", format!("{cdn}/cdn/{hash}"))
            .header("X-Repo-Commit", revision.sha.clone())
            .header("X-Linked-Etag", format!("\"{hash}\""))
            .header("X-Linked-Size", bytes.len().to_string())
            .header("ETag", "\"git-pointer-etag\"");
    }
    let commit = revision.sha.clone();
    body_reply(st, method, &file, bytes, headers, Some(commit))
}

fn renamed(st: &State, kind: &str, id: &str) -> Option<String> {
    st.repos
        .iter()
        .find(|r| r.kind == kind && r.old_ids.iter().any(|o| o == id))
        .map(|r| r.id.clone())
}

fn repo_not_found(authenticated: bool) -> Reply {
    // The hub answers 401 to anonymous requests for a repo it does not show.
    Reply::error(
        if authenticated { 404 } else { 401 },
        "RepoNotFound",
        "Repository not found",
    )
}

fn body_reply(
    st: &mut State,
    method: &str,
    name: &str,
    mut bytes: Vec<u8>,
    headers: &BTreeMap<String, String>,
    commit: Option<String>,
) -> Reply {
    let total = bytes.len();
    let etag = if is_lfs(name) {
        sha256_hex(&bytes)
    } else {
        sha256_hex(&bytes)[..40].to_string()
    };
    let mut start = 0;
    let mut reply = Reply::new(200);
    if let Some(range) = headers.get("range") {
        let from: usize = range
            .trim_start_matches("bytes=")
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if from >= total {
            return Reply::new(416).header("Content-Range", format!("bytes */{total}"));
        }
        start = from;
        reply = Reply::new(206).header(
            "Content-Range",
            format!("bytes {from}-{}/{total}", total - 1),
        );
    }
    reply = reply.header("ETag", format!("\"{etag}\""));
    if let Some(c) = commit {
        reply = reply.header("X-Repo-Commit", c);
    }
    if method == "GET" && st.corrupt_next.remove(name) {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    reply.body = bytes[start..].to_vec();
    if method == "HEAD" {
        let len = reply.body.len();
        reply = reply.header("Content-Length", len.to_string());
    } else if st.cut_next.remove(name) {
        reply.cut_at = Some(reply.body.len() / 2);
    }
    reply
}
