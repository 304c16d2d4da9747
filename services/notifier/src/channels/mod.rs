//! The providers: one module per channel, each turning a rendered message
//! into exactly the request its provider expects, and its answer into a
//! [`ProviderRef`] or a [`SendError`] that says whether to retry.

pub mod email;
pub mod pagerduty;
pub mod slack;
pub mod sms;
pub mod webhook;

use std::time::Duration;

use jiff::Timestamp;
use tocsin_proto::{
    incident::IncidentSummary,
    notify::{Channel, MessageKind, Page, ProviderRef},
};

use crate::templates::Context;

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The provider is down, slow or rate limiting: try again later (after
    /// `retry_after` when it said so). Counts against the breaker.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Sending this again cannot succeed (bad token, invalid payload,
    /// unknown target): recorded as failed, never retried.
    Permanent { reason: String },
}

impl SendError {
    pub fn retry(reason: impl Into<String>) -> Self {
        SendError::Retry {
            reason: reason.into(),
            retry_after: None,
        }
    }
    pub fn permanent(reason: impl Into<String>) -> Self {
        SendError::Permanent {
            reason: reason.into(),
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            SendError::Retry { reason, .. } | SendError::Permanent { reason } => reason,
        }
    }
}

/// One message to deliver: a page, or a change to what was sent before.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The delivery record key: the page id, or the update's id. Stable
    /// across retries (providers that take an idempotency key get it).
    pub id: String,
    pub kind: MessageKind,
    pub channel: Channel,
    pub incident: IncidentSummary,
    /// Phone number, email address, Slack user or channel; empty for
    /// PagerDuty and webhooks.
    pub address: String,
    /// `alice`, `#ops`, a PagerDuty service or webhook name.
    pub target: String,
    /// For updates: the message being updated or answered.
    pub reference: Option<ProviderRef>,
    /// The page this is (for pages).
    pub page: Option<Page>,
    pub ctx: Context,
}

impl Outgoing {
    /// The `Message-ID`-, `webhook-id`-safe form of the id.
    pub fn short_id(&self) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(self.id.as_bytes());
        hex::encode(&d[..16])
    }
}

/// Classifies an HTTP status the way the providers document it: 429 and
/// 5xx (and 408) are worth retrying, other 4xx are not.
pub fn classify_http(status: u16, retry_after: Option<Duration>, reason: String) -> SendError {
    match status {
        408 | 429 | 500..=599 => SendError::Retry {
            reason,
            retry_after,
        },
        _ => SendError::Permanent { reason },
    }
}

/// `Retry-After` in seconds (the HTTP-date form is read as "soon").
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    match v.trim().parse::<f64>() {
        Ok(s) if (0.0..86_400.0).contains(&s) => Some(Duration::from_secs_f64(s)),
        _ => Some(Duration::from_secs(5)),
    }
}

/// A transport error (no answer): always retryable.
pub fn transport_error(e: &reqwest::Error) -> SendError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // reqwest errors name the URL, which can hold a secret (webhook URLs).
    SendError::retry(format!("{what}: {}", without_url(e)))
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

/// Sends a request and reads the answer: status, `Retry-After` and body.
/// No answer at all is a retryable error.
pub async fn exchange(
    req: reqwest::RequestBuilder,
) -> Result<(u16, Option<Duration>, String), SendError> {
    let resp = req.send().await.map_err(|e| transport_error(&e))?;
    let status = resp.status().as_u16();
    let after = retry_after(resp.headers());
    Ok((status, after, body_text(resp).await))
}

/// Reads a response body, at most 64 KiB of it.
pub async fn body_text(resp: reqwest::Response) -> String {
    let bytes = resp.bytes().await.unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(65_536)]).into_owned()
}

/// One HTTP client per channel, with that channel's timeout.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    tocsin_runtime::install_crypto();
    reqwest::Client::builder()
        .timeout(if timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            timeout
        })
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("Tocsin/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// Seconds since the epoch as a Slack `ts`-like string, for `oldest`.
pub fn epoch_string(t: Timestamp) -> String {
    format!("{}.{:06}", t.as_second(), t.subsec_microsecond().max(0))
}
