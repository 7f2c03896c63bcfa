//! A remote's URL, as users write it, to an object store: `s3://bucket/prefix`
//! (S3 or an S3-compatible server: the endpoint from `remote.endpoint`, else
//! `AWS_ENDPOINT_URL`), `http(s)://host/path` (WebDAV or any server that takes
//! PUT), `file:///path` or a plain path (a folder, on a NAS say; relative to
//! the project). Credentials come from the provider's standard places (for S3
//! the `AWS_*` variables, else the `AWS_PROFILE` section of
//! `~/.aws/credentials`); they never enter a message.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use object_store::path::Path as Key;
use object_store::ObjectStore;

use super::RemoteSpec;
use crate::common::redact;

/// The store and the key prefix under which this remote's cache lives.
pub(super) fn open(spec: &RemoteSpec, project_root: &Path) -> Result<(Arc<dyn ObjectStore>, Key)> {
    let url = spec.url.trim();
    let shown = redact::url(url);
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("remote {shown}: no bucket (write `s3://BUCKET/PREFIX`)");
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retries());
        let endpoint = spec.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            // A server of one's own (MinIO, Ceph, moto) is addressed by path, not by bucket host name.
            builder = builder.with_virtual_hosted_style_request(false);
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
            if let Some((id, secret)) = credentials_file() {
                builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            }
        }
        let store = builder.build().map_err(|e| anyhow::anyhow!("remote {shown}: {}", scrub(&e.to_string(), url)))?;
        return Ok((Arc::new(store), Key::from(prefix.trim_matches('/'))));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        make_collections(url).map_err(|e| anyhow::anyhow!("remote {shown}: {}", scrub(&e, url)))?;
        // object_store's HTTP client does not take a URL's `user:password@`: sent as
        // HTTP Basic authentication on every request instead (marked sensitive, never logged).
        let (plain, login) = redact::split_credentials(url);
        let mut options = object_store::ClientOptions::new().with_allow_http(url.starts_with("http://"));
        if let Some((user, password)) = login {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let mut value = http::HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| anyhow::anyhow!("remote {shown}: the user name or password is not valid in a header"))?;
            value.set_sensitive(true);
            options = options.with_default_headers(http::HeaderMap::from_iter([(http::header::AUTHORIZATION, value)]));
        }
        let store = object_store::http::HttpBuilder::new()
            .with_url(plain.trim_end_matches('/'))
            .with_client_options(options)
            .with_retry(retries())
            .build()
            .map_err(|e| anyhow::anyhow!("remote {shown}: {}", scrub(&e.to_string(), url)))?;
        return Ok((Arc::new(store), Key::default()));
    }
    let path = match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') => std::path::PathBuf::from(p),
        Some(p) => bail!("remote {shown}: a file URL is absolute (`file:///{p}`), or write the path alone"),
        None if url.contains("://") => {
            bail!("remote {shown}: r1pipe knows s3://, http(s):// (WebDAV) and file:// remotes")
        }
        None => project_root.join(url),
    };
    std::fs::create_dir_all(&path).with_context(|| format!("remote {shown}: creating {}", path.display()))?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(&path)
        .map_err(|e| anyhow::anyhow!("remote {shown}: {e}"))?;
    Ok((Arc::new(store), Key::default()))
}

/// The WebDAV folders of the remote's path, made if missing (object_store makes
/// the folders below it, not the remote's own): MKCOL on each, outermost first;
/// 405 (it exists) and 201 (made) are both fine.
fn make_collections(url: &str) -> Result<(), String> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let path_at = url[start..].find('/').map_or(url.len(), |i| start + i);
    let mut at = path_at;
    let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(30)).build();
    while let Some(next) = url[at + 1..].find('/').map(|i| at + 1 + i).or((at + 1 < url.len()).then_some(url.len())) {
        let folder = format!("{}/", &url[..next]);
        // Messages name the folder as the user wrote it, less any `user:password@`.
        let shown = redact::url(&folder);
        match agent.request("MKCOL", &folder).call() {
            Ok(_) | Err(ureq::Error::Status(405, _)) => {}
            Err(ureq::Error::Status(code @ (401 | 403), _)) => {
                return Err(format!(
                    "the server refused the credentials for {shown} (HTTP {code}): check the user and password \
                     in the remote's URL (`https://USER:PASSWORD@host/path`)"
                ))
            }
            Err(ureq::Error::Status(code, _)) => {
                return Err(format!("making the folder {shown} answered HTTP {code}; is the server WebDAV?"))
            }
            Err(ureq::Error::Transport(t)) => return Err(format!("the server does not answer ({})", t.kind())),
        }
        at = next;
        if next >= url.len() {
            break;
        }
    }
    Ok(())
}

/// A server that drops a connection is asked again, a few times within a minute;
/// one that does not answer at all is reported within seconds, not minutes.
fn retries() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(60),
        backoff: object_store::BackoffConfig::default(),
    }
}

/// The access key of the `AWS_PROFILE` (or `default`) section of the shared
/// credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`).
fn credentials_file() -> Option<(String, String)> {
    let file = std::env::var("AWS_SHARED_CREDENTIALS_FILE")
        .ok()
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var("HOME").ok().map(|h| Path::new(&h).join(".aws/credentials")))?;
    let text = crate::common::fsutil::read_text_capped(&file, 1 << 20).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let (mut section, mut id, mut secret) = (String::new(), None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if section == profile {
            if let Some((k, v)) = line.split_once('=') {
                match k.trim() {
                    "aws_access_key_id" => id = Some(v.trim().to_string()),
                    "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
    }
    Some((id?, secret?))
}

/// An error's text with the remote's URL shown without credentials.
pub(super) fn scrub(text: &str, url: &str) -> String {
    if redact::has_credentials(url) {
        text.replace(url, &redact::url(url))
    } else {
        text.to_string()
    }
}
