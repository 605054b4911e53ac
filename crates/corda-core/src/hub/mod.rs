//! The Hugging Face hub: the local cache and downloads into it, shared by models and datasets.
//!
//! - [`cache`]: the cache layout huggingface_hub uses (`blobs/`, `snapshots/<sha>/`,
//!   `refs/<revision>`), so files fetched by Python are reused here and ours by Python.
//! - [`client`]: a small blocking HTTP client for the hub's file API: revision lookup, resumable
//!   downloads with retries, size and sha256 checks, per-file progress bars, and errors that say
//!   whether a repo is gated, missing, or only lacks a file.
//!
//! Settings come from the same environment as huggingface_hub: `HF_ENDPOINT`, `HF_HUB_CACHE` /
//! `HF_HOME`, `HF_TOKEN` / the `huggingface-cli login` token file, and `HF_HUB_OFFLINE`.
//! Nothing above this module is imported here; `model` and `data` build on it.

pub mod cache;
pub mod client;

pub use cache::{cache_root, cache_root_from, is_commit_sha, is_repo_id, RepoCache, RepoKind};
pub use client::{Hub, HubOptions, RevisionInfo};
