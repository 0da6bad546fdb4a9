//! Request extraction: JSON bodies with errors that never echo input, and bearer authentication
//! for merchants and the admin.

use axum::extract::{FromRequest, Request};
use axum::http::header;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::problem::{ApiError, codes};
use super::state::AppState;
use tokengate_cards::CardError;

/// The raw body, with size-limit and read failures mapped to problem responses.
pub struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| {
                let ct = ct.trim().to_ascii_lowercase();
                ct.starts_with("application/json")
                    || ct.starts_with("application/") && ct.contains("+json")
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::of(
                    &codes::BODY_TOO_LARGE,
                    format!("request body exceeds {} bytes", state.body_limit),
                )
            } else {
                ApiError::of(
                    &codes::BODY_UNREADABLE,
                    "the request body could not be read",
                )
            }
        })?;
        if !bytes.is_empty() && is_json == Some(false) {
            return Err(ApiError::of(
                &codes::UNSUPPORTED_MEDIA_TYPE,
                "send the body as application/json",
            ));
        }
        Ok(Body(bytes))
    }
}

/// Parses JSON with the failing field's path in the message. serde's own messages can quote the
/// offending value (which may be a card number), so quoted text and long digit runs are removed.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::of(
            &codes::BODY_MISSING,
            "a JSON request body is required",
        ));
    }
    // A valid body needs no path: parse it plainly (serde_path_to_error allocates each key it
    // passes, about 1% of a dedup request's CPU). Only a failure is parsed again, with the
    // path, for the same message as before; parsing is deterministic, so it fails the same way.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = redact(&inner.to_string());
        use serde_json::error::Category;
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::of(
                &codes::MALFORMED_JSON,
                format!("the body is not valid JSON: {msg}"),
            ),
            Category::Data => {
                // Our own card errors (fixed texts, see CardError) are semantic: 422.
                let card_code = [
                    CardError::PanCharacters,
                    CardError::PanLength,
                    CardError::PanLuhn,
                ]
                .into_iter()
                .find(|c| msg.starts_with(&c.to_string()))
                .map(|c| c.code());
                let code = if let Some(c) = card_code {
                    c
                } else if msg.starts_with("missing field") {
                    "missing_field"
                } else {
                    "invalid_field"
                };
                let detail = if path == "." || path.is_empty() {
                    msg
                } else {
                    format!("`{path}`: {msg}")
                };
                if card_code.is_some() {
                    ApiError::validation(code, detail)
                } else {
                    ApiError::coded(axum::http::StatusCode::BAD_REQUEST, code, detail)
                }
            }
        }
    })
}

/// Removes quoted segments and runs of 6+ digits from a serde message.
pub fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.len() >= 6 {
            out.push('…');
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
    for c in msg.chars() {
        if c == '"' {
            flush(&mut digits, &mut out);
            if !in_quote {
                out.push_str("\"…");
            } else {
                out.push('"');
            }
            in_quote = !in_quote;
            continue;
        }
        if in_quote {
            continue;
        }
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    // Drop serde's trailing " at line 1 column 57" noise only for data errors? Keep: it helps.
    out
}

/// Page size of the paginated lists when `limit` is absent, and its maximum.
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;

/// `?limit=&cursor=` of the paginated lists (`/v1/events`, `/v1/audit-events`); anything else
/// is refused, so a typo does not silently return page one.
pub fn page_query(raw: Option<&str>) -> Result<(usize, Option<String>), ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut cursor = None;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::of(
                            &codes::INVALID_QUERY,
                            format!("limit must be an integer from 1 to {MAX_LIMIT}"),
                        )
                    })?;
            }
            Some(("cursor", v)) if !v.is_empty() => cursor = Some(v.to_owned()),
            _ => {
                return Err(ApiError::of(
                    &codes::INVALID_QUERY,
                    "the query parameters are `limit` and `cursor`",
                ));
            }
        }
    }
    Ok((limit, cursor))
}

/// Query-string decoding (`+` is a space, `%XX` a byte); `None` for a malformed escape or a
/// result that is not UTF-8. Customer references are free text, so they arrive encoded.
fn query_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The query of the customer wallet routes (`GET`/`DELETE /v1/tokens`).
#[derive(Debug, PartialEq, Eq)]
pub struct WalletQuery {
    /// `customerReference`, decoded; required (its own rules are the domain's).
    pub customer: String,
    /// `status`: a status label (`domain::wallet::status_label`).
    pub status: Option<&'static str>,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// Parses `?customerReference=&status=&limit=&cursor=` (`paged`: the list) or
/// `?customerReference=` alone (the delete). Unknown, repeated or missing parameters are
/// refused (400 `invalid_query`) rather than ignored: a typo must not widen a delete-all or
/// silently list something else.
pub fn wallet_query(raw: Option<&str>, paged: bool) -> Result<WalletQuery, ApiError> {
    let bad = |detail: String| ApiError::of(&codes::INVALID_QUERY, detail);
    let allowed = if paged {
        "`customerReference`, `status`, `limit` and `cursor`"
    } else {
        "`customerReference`"
    };
    let mut customer = None;
    let mut status = None;
    let mut limit = None;
    let mut cursor = None;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (query_decode(k), query_decode(v)) else {
            return Err(bad(
                "the query string is not valid percent-encoded UTF-8".into()
            ));
        };
        let slot = match k.as_str() {
            "customerReference" => &mut customer,
            "status" if paged => &mut status,
            "limit" if paged => &mut limit,
            "cursor" if paged => &mut cursor,
            _ => return Err(bad(format!("the query parameters are {allowed}"))),
        };
        if slot.replace(v).is_some() {
            return Err(bad(format!("`{k}` is given more than once")));
        }
    }
    let customer = customer.ok_or_else(|| bad("`customerReference` is required".to_owned()))?;
    let status = match status {
        None => None,
        Some(s) => Some(crate::domain::wallet::status_label(&s).ok_or_else(|| {
            bad(
                "`status` must be one of PENDING, ACTIVE, SUSPENDED, INACTIVE, EXPIRED, \
                 DELETED, OTHER"
                    .to_owned(),
            )
        })?),
    };
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad(format!("limit must be an integer from 1 to {MAX_LIMIT}")))?,
    };
    Ok(WalletQuery {
        customer,
        status,
        limit,
        cursor: cursor.filter(|c| !c.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wallet_query_requires_the_customer_and_refuses_the_rest() {
        let q = wallet_query(
            Some("customerReference=cust+42%2Fa&status=ACTIVE&limit=5&cursor=c"),
            true,
        )
        .unwrap();
        assert_eq!(
            q,
            WalletQuery {
                customer: "cust 42/a".into(),
                status: Some("ACTIVE"),
                limit: 5,
                cursor: Some("c".into()),
            }
        );
        let q = wallet_query(Some("customerReference=c"), false).unwrap();
        assert_eq!((q.limit, q.status, q.cursor), (DEFAULT_LIMIT, None, None));
        for (bad, paged) in [
            (None, true),
            (Some("status=ACTIVE"), true),
            (Some("customerReference=a&customerReference=b"), true),
            (Some("customerReference=a&status=active"), true),
            (Some("customerReference=a&limit=0"), true),
            (Some("customerReference=a&page=2"), true),
            (Some("customerReference=%zz"), true),
            (Some("customerReference=%FF"), true),
            (Some("customerReference=a&status=ACTIVE"), false),
            (Some("customerReference=a&limit=5"), false),
        ] {
            let e = wallet_query(bad, paged).unwrap_err();
            assert_eq!(e.code, "invalid_query", "{bad:?}");
        }
    }

    #[test]
    fn page_query_accepts_limit_and_cursor_only() {
        assert_eq!(page_query(None).unwrap(), (DEFAULT_LIMIT, None));
        assert_eq!(page_query(Some("")).unwrap(), (DEFAULT_LIMIT, None));
        assert_eq!(
            page_query(Some("limit=5&cursor=evt_x")).unwrap(),
            (5, Some("evt_x".into()))
        );
        for bad in ["limit=0", "limit=101", "limit=x", "page=2", "limit"] {
            let e = page_query(Some(bad)).unwrap_err();
            assert_eq!(e.code, "invalid_query", "{bad}");
        }
    }

    #[test]
    fn redact_removes_values() {
        let r =
            redact(r#"invalid type: string "4111111111111111", expected u8 at line 1 column 30"#);
        assert!(!r.contains("4111"), "{r}");
        assert!(r.contains("line 1 column 30"));
        let r = redact("invalid type: integer `4111111111111111`, expected a string");
        assert!(!r.contains("4111111111111111"), "{r}");
    }
}
