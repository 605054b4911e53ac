//! A blocking client for the hub's file API, writing into the shared cache.
//!
//! Why not hf-hub's download API: hf-hub 0.5 renames a part file into place without checking
//! its size or content, drops the response of a failed request (so a 404 cannot say whether
//! the repo or the file is missing, and a 403 cannot be told from a gated repo), reads the
//! token only from a file next to the cache (not `HF_TOKEN`, not `$HF_HOME/token` when
//! `HF_HUB_CACHE` points elsewhere), and has no dataset parquet listing. This client does
//! what huggingface_hub does: it asks the hub for the commit and the file list, then per file
//! sends a HEAD for the etag and size (following the hub's relative redirects and reading
//! `X-Linked-Etag` / `X-Linked-Size` from a redirect to the CDN), streams the body into
//! `blobs/<etag>.incomplete` (resuming with `Range` where an earlier try stopped), checks the
//! size and, for LFS files whose etag is their sha256, the hash, then renames the blob into
//! place and links it from `snapshots/<sha>/`.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hub::cache::{cache_root_from, hf_home_from, RepoCache, RepoKind};
use crate::{CordaError, Result};

/// Where and how to reach the hub.
#[derive(Clone)]
pub struct HubOptions {
    /// `https://huggingface.co`, or `HF_ENDPOINT` (a mirror, or a test server).
    pub endpoint: String,
    /// The cache root (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Bearer token for gated and private repos.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network, use the cache only.
    pub offline: bool,
    /// Per-file progress bars (hidden anyway when stderr is not a terminal; off with
    /// `HF_HUB_DISABLE_PROGRESS_BARS=1`, as in huggingface_hub).
    pub progress: bool,
    /// Further attempts after a failed request or a cut-off body.
    pub retries: u32,
    /// Wait before the first retry; doubles each time (at most 10 s).
    pub retry_wait: Duration,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("retries", &self.retries)
            .field("retry_wait", &self.retry_wait)
            .finish()
    }
}

impl HubOptions {
    pub const DEFAULT_ENDPOINT: &'static str = "https://huggingface.co";

    /// The settings huggingface_hub would use in this process's environment.
    pub fn from_env() -> Self {
        Self::from_env_fn(|key| std::env::var_os(key))
    }

    /// [`HubOptions::from_env`] with the environment as a lookup function. The token is, in
    /// order: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, the file `HF_TOKEN_PATH`, the file
    /// `$HF_HOME/token` that `huggingface-cli login` writes.
    pub fn from_env_fn(env: impl Fn(&str) -> Option<OsString>) -> Self {
        let text = |key: &str| {
            env(key)
                .and_then(|v| v.into_string().ok())
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = text("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| Self::DEFAULT_ENDPOINT.to_string());
        let token_file = text("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .or_else(|| hf_home_from(&env).map(|home| home.join("token")));
        let token = text("HF_TOKEN")
            .or_else(|| text("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                token_file
                    .and_then(|path| std::fs::read_to_string(path).ok())
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let truthy = |key: &str| {
            text(key).is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            })
        };
        let offline = truthy("HF_HUB_OFFLINE");
        HubOptions {
            endpoint,
            cache_dir: cache_root_from(&env),
            token,
            offline,
            progress: !truthy("HF_HUB_DISABLE_PROGRESS_BARS"),
            retries: 5,
            retry_wait: Duration::from_millis(500),
        }
    }
}

/// A repo revision as the hub reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionInfo {
    /// The commit the revision points at.
    pub sha: String,
    /// Every file of the repo at that commit (paths relative to the repo root).
    pub files: Vec<String>,
}

/// The hub client and cache writer. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    opts: HubOptions,
    agent: ureq::Agent,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub").field("opts", &self.opts).finish()
    }
}

/// What a request or a transfer ran into, before it is explained as a [`CordaError`].
#[derive(Debug)]
enum Failure {
    Status {
        code: u16,
        error_code: Option<String>,
        message: Option<String>,
    },
    Transport(String),
    /// The body stopped before the announced size.
    Short {
        got: u64,
        want: u64,
    },
    /// The body was complete but is not the file (hash or size differ); restart from zero.
    Corrupt(String),
    /// A local file operation failed; not retried.
    Local(CordaError),
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { code, .. } => *code == 429 || *code >= 500,
            Failure::Transport(_) | Failure::Short { .. } | Failure::Corrupt(_) => true,
            Failure::Local(_) => false,
        }
    }
}

impl From<CordaError> for Failure {
    fn from(e: CordaError) -> Self {
        Failure::Local(e)
    }
}

/// What a request was for, so that a failure can be explained.
struct Target<'a> {
    kind: RepoKind,
    id: &'a str,
    revision: &'a str,
    file: Option<&'a str>,
}

/// The etag, size and final URL of one file.
#[derive(Debug)]
struct FileMeta {
    url: String,
    etag: String,
    size: u64,
}

impl Hub {
    pub fn new(opts: HubOptions) -> Self {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(120))
            .try_proxy_from_env(true)
            .user_agent(&format!("corda/{}", env!("CARGO_PKG_VERSION")))
            .build();
        Hub { opts, agent }
    }

    /// A client with [`HubOptions::from_env`].
    pub fn from_env() -> Self {
        Self::new(HubOptions::from_env())
    }

    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    /// Uses `token` (e.g. `--token`) instead of the one found in the environment, if given.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        if let Some(t) = token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
        {
            self.opts.token = Some(t);
        }
        self
    }

    /// Uses this cache root instead of the one named by the environment.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.opts.cache_dir = Some(dir.into());
        self
    }

    /// Hides the per-file progress bars when `progress` is false (e.g. `--quiet`); bars the
    /// environment turned off stay off.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.opts.progress &= progress;
        self
    }

    pub fn offline(&self) -> bool {
        self.opts.offline
    }

    /// The cache root, or an error saying how to name one.
    pub fn cache_root(&self) -> Result<&Path> {
        self.opts.cache_dir.as_deref().ok_or_else(|| {
            CordaError::Hub(
                "cannot locate the Hugging Face cache (HF_HUB_CACHE, HF_HOME and HOME are \
                 unset); set HF_HUB_CACHE to a directory"
                    .to_string(),
            )
        })
    }

    /// The cache folder of one repo.
    pub fn repo_cache(&self, kind: RepoKind, id: &str) -> Result<RepoCache> {
        Ok(RepoCache::new(self.cache_root()?, kind, id))
    }

    /// The error for a repo that is needed but not cached while `HF_HUB_OFFLINE` is set.
    pub fn offline_error(&self, kind: RepoKind, id: &str, what: &str) -> CordaError {
        let at = self
            .opts
            .cache_dir
            .as_ref()
            .map(|d| format!(" at {}", d.display()))
            .unwrap_or_default();
        let flag = match kind {
            RepoKind::Model => "",
            RepoKind::Dataset => "--repo-type dataset ",
        };
        CordaError::Hub(format!(
            "{} `{id}`: the Hugging Face cache{at} lacks {what}, and downloads are off \
             (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE to download it, fetch it with \
             `huggingface-cli download {flag}{id}`, or point HF_HUB_CACHE / HF_HOME at the cache \
             that holds it",
            kind.noun()
        ))
    }

    /// Asks the hub which commit `revision` is and which files the repo holds there.
    pub fn revision_info(&self, kind: RepoKind, id: &str, revision: &str) -> Result<RevisionInfo> {
        self.lookup_revision(kind, id, revision, false)?
            .ok_or_else(|| {
                CordaError::Hub(format!(
                    "{} `{id}` has no revision `{revision}`",
                    kind.noun()
                ))
            })
    }

    /// [`Hub::revision_info`], but `None` when the repo exists without that revision (e.g. a
    /// dataset the hub has not converted to parquet: no `refs/convert/parquet`).
    pub fn revision_info_if_exists(
        &self,
        kind: RepoKind,
        id: &str,
        revision: &str,
    ) -> Result<Option<RevisionInfo>> {
        self.lookup_revision(kind, id, revision, true)
    }

    fn lookup_revision(
        &self,
        kind: RepoKind,
        id: &str,
        revision: &str,
        optional: bool,
    ) -> Result<Option<RevisionInfo>> {
        self.refuse_offline(kind, id)?;
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.opts.endpoint,
            kind.plural(),
            quote_path(id),
            quote(revision)
        );
        let target = Target {
            kind,
            id,
            revision,
            file: None,
        };
        let answer = self.retrying(&target, || {
            let resp = self.send_following("GET", &url)?;
            resp.into_string()
                .map_err(|e| Failure::Transport(format!("reading {url}: {e}")))
        });
        let text = match answer {
            Ok(text) => text,
            Err(Failure::Status {
                code: 404,
                error_code: Some(code),
                ..
            }) if optional && code == "RevisionNotFound" => return Ok(None),
            Err(f) => return Err(self.explain(f, &target)),
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            CordaError::Hub(format!(
                "{url} did not answer with JSON ({e}); is HF_ENDPOINT ({}) a Hugging Face hub?",
                self.opts.endpoint
            ))
        })?;
        let sha = value
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty() && !s.contains(['/', '\\', '.']))
            .ok_or_else(|| {
                CordaError::Hub(format!(
                    "the hub's answer for {} `{id}` at `{revision}` has no commit sha",
                    kind.noun()
                ))
            })?
            .to_string();
        let files = value
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|list| {
                list.iter()
                    .filter_map(|f| f.get("rfilename").and_then(|n| n.as_str()))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(RevisionInfo { sha, files }))
    }

    /// Makes sure `files` of repo `id` at commit `sha` are in the cache (downloading those
    /// that are not), records `revision → sha` in `refs/`, and returns the snapshot directory.
    pub fn download(
        &self,
        kind: RepoKind,
        id: &str,
        revision: &str,
        sha: &str,
        files: &[String],
    ) -> Result<PathBuf> {
        let cache = self.repo_cache(kind, id)?;
        let snapshot = cache.snapshot_dir(sha);
        for file in files {
            if !is_safe_relative(file) {
                return Err(CordaError::Hub(format!(
                    "{} `{id}` lists a file with an unsafe path `{file}`; refusing to write it",
                    kind.noun()
                )));
            }
            if snapshot.join(file).is_file() {
                continue;
            }
            self.refuse_offline(kind, id)?;
            self.download_file(&cache, kind, id, revision, sha, file)?;
        }
        std::fs::create_dir_all(&snapshot).map_err(|e| CordaError::io(&snapshot, e))?;
        cache.write_ref(revision, sha)?;
        Ok(snapshot)
    }

    fn refuse_offline(&self, kind: RepoKind, id: &str) -> Result<()> {
        if self.opts.offline {
            return Err(self.offline_error(kind, id, "files"));
        }
        Ok(())
    }

    fn file_url(&self, kind: RepoKind, id: &str, sha: &str, file: &str) -> String {
        let prefix = match kind {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        };
        format!(
            "{}/{prefix}{}/resolve/{}/{}",
            self.opts.endpoint,
            quote_path(id),
            quote(sha),
            quote_path(file)
        )
    }

    fn download_file(
        &self,
        cache: &RepoCache,
        kind: RepoKind,
        id: &str,
        revision: &str,
        sha: &str,
        file: &str,
    ) -> Result<()> {
        let target = Target {
            kind,
            id,
            revision,
            file: Some(file),
        };
        let url = self.file_url(kind, id, sha, file);
        let meta = self
            .retrying(&target, || self.file_meta(&url))
            .map_err(|f| self.explain(f, &target))?;
        let blob = cache.blob_path(&meta.etag);
        let blobs = blob.parent().unwrap_or(cache.dir()).to_path_buf();
        std::fs::create_dir_all(&blobs).map_err(|e| CordaError::io(&blobs, e))?;
        let _lock = FileLock::acquire(&cache.lock_path(&meta.etag))?;
        let complete = std::fs::metadata(&blob).is_ok_and(|m| m.len() == meta.size);
        if !complete {
            let part = blobs.join(format!("{}.incomplete", meta.etag));
            let bar = self.progress_bar(id, file, meta.size);
            let result = self.retrying(&target, || self.fetch_body(&meta, &part, &bar));
            bar.finish_and_clear();
            result.map_err(|f| match f {
                Failure::Short { got, want } => CordaError::Hub(format!(
                    "the download of `{file}` from {} `{id}` stopped at {got} of {want} bytes \
                     after {} attempts; rerun the command to resume it (the part is kept in {})",
                    kind.noun(),
                    self.opts.retries + 1,
                    part.display()
                )),
                other => self.explain(other, &target),
            })?;
            std::fs::rename(&part, &blob).map_err(|e| CordaError::io(&blob, e))?;
        }
        cache.link(sha, file, &meta.etag)?;
        Ok(())
    }

    fn progress_bar(&self, id: &str, file: &str, size: u64) -> indicatif::ProgressBar {
        if !self.opts.progress {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if bar.is_hidden() {
            // Not a terminal (a log file, CI): one line per file instead of a bar.
            eprintln!("downloading {id}/{file} ({})", indicatif::HumanBytes(size));
        }
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(file.to_string());
        bar
    }

    /// HEAD the file: its etag and size, and where its bytes are.
    fn file_meta(&self, url: &str) -> std::result::Result<FileMeta, Failure> {
        let mut url = url.to_string();
        let mut linked_etag = None;
        let mut linked_size = None;
        for _ in 0..10 {
            let resp = self.send("HEAD", &url, None)?;
            linked_etag = linked_etag.or_else(|| header(&resp, "x-linked-etag"));
            linked_size = linked_size.or_else(|| header(&resp, "x-linked-size"));
            if (300..400).contains(&resp.status()) {
                let location = header(&resp, "location").ok_or_else(|| {
                    Failure::Transport(format!("{url} redirected without a Location"))
                })?;
                let next = join_url(&url, &location);
                if host_of(&next) == host_of(&url) {
                    // A renamed repo: the hub itself answers at the new place.
                    url = next;
                    continue;
                }
                // The CDN: the hub's redirect already described the file.
                let (etag, size) = match (linked_etag.clone(), linked_size.clone()) {
                    (Some(e), Some(s)) => (e, s),
                    (etag, _) => {
                        let cdn = self.send("HEAD", &next, None)?;
                        let etag = etag.or_else(|| header(&cdn, "etag"));
                        (
                            etag.unwrap_or_default(),
                            header(&cdn, "content-length").unwrap_or_default(),
                        )
                    }
                };
                return meta(next, &etag, &size);
            }
            let etag = linked_etag
                .or_else(|| header(&resp, "etag"))
                .unwrap_or_default();
            let size = linked_size
                .or_else(|| header(&resp, "content-length"))
                .unwrap_or_default();
            return meta(url, &etag, &size);
        }
        Err(Failure::Transport(format!("{url}: too many redirects")))
    }

    /// One attempt at the body: resumes after the bytes `part` already holds.
    fn fetch_body(
        &self,
        meta: &FileMeta,
        part: &Path,
        bar: &indicatif::ProgressBar,
    ) -> std::result::Result<(), Failure> {
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > meta.size {
            truncate(part)?;
            have = 0;
        }
        if have < meta.size {
            let resp = self.send("GET", &meta.url, (have > 0).then_some(have))?;
            let start = match resp.status() {
                206 => content_range_start(&resp, meta.size).unwrap_or(u64::MAX),
                _ => 0,
            };
            if start != have {
                // The server ignored or misread the range: start over from the first byte.
                truncate(part)?;
                have = 0;
                if start != 0 {
                    return Err(Failure::Corrupt(format!(
                        "{} answered a range request with an unexpected Content-Range",
                        meta.url
                    )));
                }
            }
            let mut out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(part)
                .map_err(|e| CordaError::io(part, e))?;
            bar.set_position(have);
            let mut body = resp.into_reader().take(meta.size - have + 1);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // A cut connection: keep what arrived, the next attempt resumes.
                    Err(_) => break,
                };
                out.write_all(&buf[..n])
                    .map_err(|e| CordaError::io(part, e))?;
                bar.inc(n as u64);
            }
            out.flush().map_err(|e| CordaError::io(part, e))?;
        }
        let got = std::fs::metadata(part)
            .map_err(|e| CordaError::io(part, e))?
            .len();
        if got < meta.size {
            return Err(Failure::Short {
                got,
                want: meta.size,
            });
        }
        if got > meta.size {
            truncate(part)?;
            return Err(Failure::Corrupt(format!(
                "{} sent more than the {} bytes it announced",
                meta.url, meta.size
            )));
        }
        if let Some(expected) = sha256_etag(&meta.etag) {
            let actual = sha256_file(part)?;
            if actual != expected {
                truncate(part)?;
                return Err(Failure::Corrupt(format!(
                    "the downloaded bytes hash to sha256 {actual}, not the {expected} the hub \
                     announced"
                )));
            }
        }
        Ok(())
    }

    /// Runs `f` again after retryable failures, waiting longer each time.
    fn retrying<T>(
        &self,
        target: &Target<'_>,
        mut f: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> std::result::Result<T, Failure> {
        let mut wait = self.opts.retry_wait;
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && attempt < self.opts.retries => {
                    attempt += 1;
                    tracing::warn!(
                        "{} `{}`{}: {e:?}; retry {attempt} of {} in {wait:?}",
                        target.kind.noun(),
                        target.id,
                        target
                            .file
                            .map(|f| format!(" file `{f}`"))
                            .unwrap_or_default(),
                        self.opts.retries
                    );
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A request that follows the hub's redirects (a renamed repo such as `nq_open` →
    /// `google-research-datasets/nq_open` answers 307 with the new path).
    fn send_following(
        &self,
        method: &str,
        url: &str,
    ) -> std::result::Result<ureq::Response, Failure> {
        let mut url = url.to_string();
        for _ in 0..10 {
            let resp = self.send(method, &url, None)?;
            if !(300..400).contains(&resp.status()) {
                return Ok(resp);
            }
            let location = header(&resp, "location").ok_or_else(|| {
                Failure::Transport(format!("{url} redirected without a Location"))
            })?;
            url = join_url(&url, &location);
        }
        Err(Failure::Transport(format!("{url}: too many redirects")))
    }

    /// One request. The token goes only to the hub's own host, never to a CDN it redirects to.
    fn send(
        &self,
        method: &str,
        url: &str,
        from: Option<u64>,
    ) -> std::result::Result<ureq::Response, Failure> {
        let mut req = self
            .agent
            .request(method, url)
            .set("Accept-Encoding", "identity");
        if let Some(token) = &self.opts.token {
            if host_of(url) == host_of(&self.opts.endpoint) {
                req = req.set("Authorization", &format!("Bearer {token}"));
            }
        }
        if let Some(from) = from {
            req = req.set("Range", &format!("bytes={from}-"));
        }
        match req.call() {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(code, resp)) => Err(Failure::Status {
                code,
                error_code: header(&resp, "x-error-code"),
                message: header(&resp, "x-error-message"),
            }),
            Err(ureq::Error::Transport(t)) => Err(Failure::Transport(t.to_string())),
        }
    }

    /// Turns a failure into a message that says what to do.
    fn explain(&self, failure: Failure, t: &Target<'_>) -> CordaError {
        let noun = t.kind.noun();
        let id = t.id;
        let endpoint = &self.opts.endpoint;
        let page = match t.kind {
            RepoKind::Model => format!("{endpoint}/{id}"),
            RepoKind::Dataset => format!("{endpoint}/datasets/{id}"),
        };
        let token_hint = "set HF_TOKEN, pass --token, or run `huggingface-cli login`";
        let msg = match failure {
            Failure::Local(e) => return e,
            Failure::Status {
                code,
                error_code,
                message,
            } => {
                let detail = message.map(|m| format!(" (hub: {m})")).unwrap_or_default();
                match (code, error_code.as_deref()) {
                    (401 | 404, Some("RepoNotFound")) | (404, None) if t.file.is_none() => {
                        let private = if self.opts.token.is_some() {
                            " (or the token given has no access to it)".to_string()
                        } else {
                            format!("; if it is private, {token_hint}")
                        };
                        if t.revision != "main" && error_code.is_none() {
                            format!(
                                "{noun} `{id}` or its revision `{}` does not exist on \
                                 {endpoint}{private}{detail}",
                                t.revision
                            )
                        } else {
                            format!(
                                "{noun} `{id}` does not exist on {endpoint} (check the \
                                 id){private}{detail}"
                            )
                        }
                    }
                    (401 | 404, Some("RepoNotFound")) => format!(
                        "{noun} `{id}` does not exist on {endpoint} (check the id); if it is \
                         private, {token_hint}{detail}"
                    ),
                    (404, Some("RevisionNotFound")) => format!(
                        "{noun} `{id}` has no revision `{}`; pass an existing branch, tag or \
                         commit{detail}",
                        t.revision
                    ),
                    (404, _) => format!(
                        "{noun} `{id}` exists but has no file `{}` at revision `{}`{detail}",
                        t.file.unwrap_or("?"),
                        t.revision
                    ),
                    (401 | 403, _) if self.opts.token.is_none() => format!(
                        "{noun} `{id}` is gated or private (HTTP {code}) and no token was found: \
                         accept its licence on {page} while logged in, then {token_hint}{detail}"
                    ),
                    (401 | 403, _) => format!(
                        "access to {noun} `{id}` was refused with the token given (HTTP {code}): \
                         accept its licence on {page} with the account the token belongs to \
                         (approval can take a while), or check that the token is valid{detail}"
                    ),
                    (429, _) => format!(
                        "the hub refused more requests for {noun} `{id}` (HTTP 429, rate \
                         limit) after {} attempts; wait a minute and rerun, or set a \
                         token{detail}",
                        self.opts.retries + 1
                    ),
                    _ => format!(
                        "the hub answered HTTP {code} for {noun} `{id}`{} after {} attempts; \
                         rerun later (a partial download resumes){detail}",
                        t.file.map(|f| format!(" file `{f}`")).unwrap_or_default(),
                        self.opts.retries + 1
                    ),
                }
            }
            Failure::Transport(e) => format!(
                "cannot reach the hub at {endpoint} for {noun} `{id}` ({e}) after {} attempts; \
                 check the network or proxy (HTTPS_PROXY), or set HF_HUB_OFFLINE=1 to use only \
                 the local cache",
                self.opts.retries + 1
            ),
            Failure::Short { got, want } => format!(
                "the download of {noun} `{id}` stopped at {got} of {want} bytes; rerun to resume"
            ),
            Failure::Corrupt(e) => format!(
                "the download of {noun} `{id}`{} is corrupt: {e}; the part was deleted, rerun to \
                 download it again",
                t.file.map(|f| format!(" file `{f}`")).unwrap_or_default()
            ),
        };
        CordaError::Hub(msg)
    }
}

fn meta(url: String, etag: &str, size: &str) -> std::result::Result<FileMeta, Failure> {
    let etag = normalize_etag(etag);
    if etag.is_empty() || etag.contains(['/', '\\']) || etag.starts_with('.') {
        return Err(Failure::Local(CordaError::Hub(format!(
            "{url} sent no usable ETag; is HF_ENDPOINT a Hugging Face hub?"
        ))));
    }
    let size = size.trim().parse::<u64>().map_err(|_| {
        Failure::Local(CordaError::Hub(format!(
            "{url} sent no file size (Content-Length / X-Linked-Size); is HF_ENDPOINT a Hugging \
             Face hub?"
        )))
    })?;
    Ok(FileMeta { url, etag, size })
}

fn header(resp: &ureq::Response, name: &str) -> Option<String> {
    resp.header(name).map(str::to_string)
}

/// `W/"abc"` → `abc`, as huggingface_hub names blobs.
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// LFS files' etags are the sha256 of their content.
fn sha256_etag(etag: &str) -> Option<String> {
    (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| etag.to_ascii_lowercase())
}

fn sha256_file(path: &Path) -> std::result::Result<String, Failure> {
    use sha2::Digest;
    let mut file = File::open(path).map_err(|e| CordaError::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| CordaError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn truncate(path: &Path) -> std::result::Result<(), Failure> {
    File::create(path).map_err(|e| Failure::Local(CordaError::io(path, e)))?;
    Ok(())
}

/// The first byte of a `Content-Range: bytes a-b/total` answer, if the total is `size`.
fn content_range_start(resp: &ureq::Response, size: u64) -> Option<u64> {
    let value = resp.header("content-range")?;
    let rest = value.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    if total.trim() != "*" && total.trim().parse::<u64>().ok()? != size {
        return None;
    }
    range.split_once('-')?.0.trim().parse().ok()
}

/// `scheme://host:port` of a URL, to keep the token on the hub's own host.
fn host_of(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(url.len());
    &url[..end]
}

fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", host_of(base))
    } else {
        let dir = base.rsplit_once('/').map(|(d, _)| d).unwrap_or(base);
        format!("{dir}/{location}")
    }
}

/// Percent-encodes everything but unreserved characters (a revision such as
/// `refs/convert/parquet` becomes one path segment, as huggingface_hub sends it).
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// [`quote`] per path segment, keeping the `/` between them.
fn quote_path(path: &str) -> String {
    path.split('/').map(quote).collect::<Vec<_>>().join("/")
}

/// A repo path we may write under a snapshot: relative, no `..`.
fn is_safe_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// An exclusive lock on huggingface_hub's lock file for a blob, so that two processes (ours
/// or Python's) never write the same blob at once.
struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CordaError::io(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| CordaError::io(path, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor we own; it is released when the file closes.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                return Err(CordaError::io(path, std::io::Error::last_os_error()));
            }
        }
        Ok(FileLock(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> HubOptions {
        HubOptions::from_env_fn(|key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn settings_follow_huggingface_hub() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path().to_str().unwrap();
        let o = opts(&[("HF_HOME", h)]);
        assert_eq!(o.endpoint, "https://huggingface.co");
        assert_eq!(o.token, None);
        assert!(!o.offline);
        assert_eq!(o.cache_dir, Some(home.path().join("hub")));

        std::fs::write(home.path().join("token"), "hf_file\n").unwrap();
        assert_eq!(opts(&[("HF_HOME", h)]).token.as_deref(), Some("hf_file"));
        let o = opts(&[
            ("HF_HOME", h),
            ("HF_TOKEN", "hf_env"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "1"),
        ]);
        assert_eq!(o.token.as_deref(), Some("hf_env"));
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert!(o.offline);
        assert!(
            !format!("{o:?}").contains("hf_env"),
            "the token is never printed"
        );
        assert!(!opts(&[("HF_HUB_OFFLINE", "0")]).offline);
        assert!(o.progress);
        assert!(!opts(&[("HF_HUB_DISABLE_PROGRESS_BARS", "1")]).progress);
        let hub = Hub::new(o).with_token(Some("hf_flag".into()));
        assert_eq!(hub.options().token.as_deref(), Some("hf_flag"));
    }

    #[test]
    fn urls_and_headers() {
        assert_eq!(quote("refs/convert/parquet"), "refs%2Fconvert%2Fparquet");
        assert_eq!(quote_path("a b/c.json"), "a%20b/c.json");
        assert_eq!(host_of("http://127.0.0.1:8/x/y"), "http://127.0.0.1:8");
        assert_eq!(
            join_url("http://h:1/a/b", "/c/d"),
            "http://h:1/c/d".to_string()
        );
        assert_eq!(join_url("http://h/a/b", "https://cdn/x"), "https://cdn/x");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert!(sha256_etag(&"a".repeat(64)).is_some());
        assert!(sha256_etag(&"a".repeat(40)).is_none());
        assert!(!is_safe_relative("../x"));
        assert!(!is_safe_relative("/etc/passwd"));
        assert!(is_safe_relative("data/train-0.parquet"));
    }
}
