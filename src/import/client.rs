//! The importer's client of the REST API: one `POST /v1/tokens` per card, under a client-side
//! rate limit, retried (bounded, with backoff) on the answers that say "later" (429, 503 and
//! other 5xx, `idempotency_in_flight`), each with the line's own `Idempotency-Key`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::input::CardLine;

/// What became of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 201 (`created`) or 200 (the merchant already had a token for this card).
    Token {
        created: bool,
        id: String,
        status: String,
        last4: Option<String>,
    },
    /// The gateway refused the line (4xx): resending it cannot help.
    Refused {
        http_status: u16,
        code: String,
        detail: String,
    },
    /// Still failing after the last retry (overload, outage, network): a later run resends it.
    Transient {
        http_status: Option<u16>,
        code: String,
        detail: String,
    },
    /// An answer that no line can get past (bad API key, missing scope, wrong URL): the run stops.
    Fatal {
        http_status: Option<u16>,
        code: String,
        detail: String,
    },
    /// The run is stopping: the line was left unfinished (a later run resends it, same key).
    Abandoned,
}

/// Retry bounds.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff; doubled each retry (with jitter) up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured (a larger one is cut to this).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 8,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

pub struct ApiClient {
    http: reqwest::Client,
    url: reqwest::Url,
    api_key: SecretString,
    usage: String,
    limiter: Option<DefaultDirectRateLimiter>,
    retry: RetryPolicy,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    card: CardBody<'a>,
    usage: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_reference: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CardBody<'a> {
    number: &'a str,
    expiry_month: u16,
    expiry_year: u16,
}

#[derive(Deserialize)]
struct TokenAnswer {
    id: String,
    status: String,
    #[serde(default)]
    card: Option<CardAnswer>,
}

#[derive(Deserialize)]
struct CardAnswer {
    #[serde(default)]
    last4: Option<String>,
}

#[derive(Deserialize, Default)]
struct ProblemAnswer {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

/// A request body that is wiped when the last reference to it (ours, or the HTTP stack's) is
/// dropped: it holds the card number.
struct WipedBody(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for WipedBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --api URL: {0}")]
    Url(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    #[error("--rate must be a positive number of requests per second")]
    Rate,
}

/// One attempt's answer, before the retry decision.
enum Attempt {
    Done(Outcome),
    Retry {
        after: Option<Duration>,
        http_status: Option<u16>,
        code: String,
        detail: String,
    },
}

impl ApiClient {
    /// `api`: the gateway's base URL (`https://gw.example`); `rate`: requests per second
    /// (fractions allowed), bursting at most `burst` at once.
    pub fn new(
        api: &str,
        api_key: SecretString,
        usage: String,
        rate: Option<f64>,
        burst: u32,
        retry: RetryPolicy,
    ) -> Result<ApiClient, ClientError> {
        // reqwest is built without a default rustls crypto provider (no aws-lc): use ring,
        // the one the gateway uses. Fails only when one is installed already, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = reqwest::Url::parse(api).map_err(|e| ClientError::Url(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::Url("the scheme must be http or https".into()));
        }
        let url = base
            .join("/v1/tokens")
            .map_err(|e| ClientError::Url(e.to_string()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("tokengate-import/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        let limiter = match rate {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 => {
                let period = Duration::from_secs_f64(1.0 / r);
                let burst = NonZeroU32::new(burst.clamp(1, r.ceil().max(1.0) as u32))
                    .unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(period).ok_or(ClientError::Rate)?;
                Some(RateLimiter::direct(quota.allow_burst(burst)))
            }
            Some(_) => return Err(ClientError::Rate),
        };
        Ok(ApiClient {
            http,
            url,
            api_key,
            usage,
            limiter,
            retry,
        })
    }

    /// Tokenizes one card, retrying as the policy allows. `stop` turning true means the run is
    /// stopping: no further attempt is started (the line comes back `Abandoned`).
    pub async fn tokenize(
        self: &Arc<Self>,
        card: &CardLine,
        idempotency_key: &str,
        mut stop: watch::Receiver<bool>,
    ) -> Outcome {
        let body = self.body(card);
        let mut retries = 0u32;
        loop {
            if *stop.borrow() {
                return Outcome::Abandoned;
            }
            if let Some(l) = &self.limiter {
                tokio::select! {
                    _ = l.until_ready() => {}
                    _ = stop.changed() => return Outcome::Abandoned,
                }
            }
            let (after, http_status, code, detail) =
                match self.attempt(body.clone(), idempotency_key).await {
                    Attempt::Done(o) => return o,
                    Attempt::Retry {
                        after,
                        http_status,
                        code,
                        detail,
                    } => (after, http_status, code, detail),
                };
            if retries >= self.retry.max_retries {
                return Outcome::Transient {
                    http_status,
                    code,
                    detail: format!("{detail} (after {} attempts)", retries + 1),
                };
            }
            let wait = match after {
                Some(a) => a.min(self.retry.max_retry_after),
                None => self.backoff(retries),
            };
            retries += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return Outcome::Abandoned,
            }
        }
    }

    /// Exponential backoff with full jitter, so many workers hit by the same outage do not
    /// come back in step.
    fn backoff(&self, retries: u32) -> Duration {
        let exp = self
            .retry
            .base_backoff
            .saturating_mul(1u32 << retries.min(16))
            .min(self.retry.max_backoff);
        let ms = exp.as_millis().max(1) as u64;
        Duration::from_millis(ms / 2 + rand::random_range(0..=ms / 2))
    }

    fn body(&self, card: &CardLine) -> Bytes {
        let number = card.number.expose_secret();
        let body = Body {
            card: CardBody {
                number,
                expiry_month: card.expiry_month,
                expiry_year: card.expiry_year,
            },
            usage: &self.usage,
            customer_reference: card.customer_reference.as_deref(),
        };
        // Sized up front (JSON escaping at most sextuples a character) so the buffer is never
        // reallocated, which would leave an unwiped copy of the card number behind.
        let cap = 160
            + number.len() * 6
            + self.usage.len() * 6
            + card.customer_reference.as_ref().map_or(0, |c| c.len() * 6);
        let mut buf = Zeroizing::new(Vec::with_capacity(cap));
        // Serializing plain strings and integers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, &body);
        Bytes::from_owner(WipedBody(buf))
    }

    async fn attempt(&self, body: Bytes, idempotency_key: &str) -> Attempt {
        let sent = self
            .http
            .post(self.url.clone())
            .bearer_auth(self.api_key.expose_secret())
            .header("idempotency-key", idempotency_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                // The error's own text names the URL and the cause; the class is enough and
                // keeps anything request-specific out of the errors file.
                let detail = if e.is_timeout() {
                    "the request timed out"
                } else if e.is_connect() {
                    "cannot connect to the gateway"
                } else {
                    "the request failed"
                };
                return Attempt::Retry {
                    after: None,
                    http_status: None,
                    code: "transport_error".into(),
                    detail: detail.into(),
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.unwrap_or_default();
        if status == 200 || status == 201 {
            return match serde_json::from_slice::<TokenAnswer>(&bytes) {
                Ok(t) => Attempt::Done(Outcome::Token {
                    created: status == 201,
                    id: t.id,
                    status: t.status,
                    last4: t.card.and_then(|c| c.last4),
                }),
                Err(_) => Attempt::Done(Outcome::Fatal {
                    http_status: Some(status),
                    code: "unexpected_response".into(),
                    detail: "the answer is not a token: is --api a tokengate gateway?".into(),
                }),
            };
        }
        let problem: ProblemAnswer = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = problem
            .code
            .clone()
            .unwrap_or_else(|| format!("http_{status}"));
        // The API's `detail` never echoes submitted values (docs/api.md, "Errors").
        let detail = problem
            .detail
            .unwrap_or_else(|| "answer without a problem document".into());
        match (status, code.as_str()) {
            (429 | 500 | 502 | 503 | 504, _) => Attempt::Retry {
                after: retry_after,
                http_status: Some(status),
                code,
                detail,
            },
            // Another request with this key is still running (e.g. one abandoned by an
            // interrupted run): its answer will be replayed once it is done.
            (409, "idempotency_in_flight" | "concurrent_update") => Attempt::Retry {
                after: retry_after,
                http_status: Some(status),
                code,
                detail,
            },
            (401 | 403 | 405 | 415, _) | (404, _) | (_, "unsupported_media_type") => {
                Attempt::Done(Outcome::Fatal {
                    http_status: Some(status),
                    code,
                    detail,
                })
            }
            (400..=499, _) => Attempt::Done(Outcome::Refused {
                http_status: status,
                code,
                detail,
            }),
            _ => Attempt::Retry {
                after: retry_after,
                http_status: Some(status),
                code,
                detail,
            },
        }
    }
}
