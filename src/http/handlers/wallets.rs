//! Customer wallets (`domain::wallet`): `GET /v1/tokens?customerReference=...` lists a
//! customer's tokens (metadata only, the `GET /v1/tokens/{id}` view), newest first and
//! cursor-paginated; `DELETE /v1/tokens?customerReference=...` deletes all of them, each through
//! the single-token delete path, and reports per token.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::audit::{AuditAction, SUCCESS};
use crate::domain::wallet::WalletKey;
use crate::http::audit::{self, AuditCtx};
use crate::http::auth::MerchantAuth;
use crate::http::dto::TokenView;
use crate::http::extract::wallet_query;
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::{IdempotencyKeyHeader, WalletDeleteParams, WalletListParams};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// One page of a customer's tokens.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenPage<'a> {
    /// Newest first (creation time; ties by token id). A page may hold fewer than `limit`
    /// tokens even when more follow.
    data: Vec<TokenView<'a>>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    #[schema(example = "019b7ca98d03-tok_d7XXXyQu2WZRKlyWvsMJRA")]
    next_cursor: Option<String>,
    /// `false` while the gateway is still indexing tokens stored before customer wallets
    /// existed (a one-time job after an upgrade): the list may then miss the customer's older
    /// tokens. `true` once every token is indexed.
    #[schema(example = true)]
    index_complete: bool,
}

/// A token a delete-all could not delete, and why.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletDeleteFailure {
    #[schema(example = "tok_d7XXXyQu2WZRKlyWvsMJRA")]
    id: String,
    /// The HTTP status `DELETE /v1/tokens/{id}` would have answered.
    #[schema(example = 503)]
    status: u16,
    /// Its problem code (`d1_unavailable`, `d1_timeout`, `concurrent_update`, ...).
    #[schema(example = "d1_unavailable")]
    code: &'static str,
    /// For humans; never echoes submitted values.
    detail: String,
}

/// What `DELETE /v1/tokens?customerReference=...` did.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletDeletion {
    #[schema(example = "cust-42")]
    customer_reference: String,
    /// Tokens this call deleted (they are `DELETED` now). Empty when nothing was left to
    /// delete: tokens deleted earlier are not listed again.
    deleted: Vec<String>,
    /// Tokens this call could not delete; they keep their status and a next call retries them.
    failed: Vec<WalletDeleteFailure>,
    /// `false` when the customer had more live tokens than one call deletes (50): call again.
    complete: bool,
}

/// The merchant's tokens of one customer: metadata only (never the card number), newest first.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(WalletListParams),
    responses(
        (status = 200, description = "One page of the customer's tokens", body = TokenPage),
        codes::WalletListProblems,
    ))]
pub async fn list_customer_tokens(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    RawQuery(query): RawQuery,
) -> Response {
    let q = match wallet_query(query.as_deref(), true) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let after = match q.cursor.as_deref().map(WalletKey::parse) {
        None => None,
        Some(Some(k)) => Some(k),
        Some(None) => {
            return ApiError::of(
                &codes::INVALID_CURSOR,
                "the cursor is not a nextCursor this list returned",
            )
            .into_response();
        }
    };
    let (page, index_complete) = match state
        .services
        .list_customer_tokens(&merchant.id, &q.customer, q.status, after.as_ref(), q.limit)
        .await
    {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    Reply::json(
        StatusCode::OK,
        &TokenPage {
            data: page.tokens.iter().map(TokenView::from).collect(),
            next_cursor: page.next.map(|k| k.to_string()),
            index_complete,
        },
    )
    .into_response()
}

/// Deletes every token of one customer ("forget me"): each as `DELETE /v1/tokens/{id}` does
/// (at D1, then here; audited as `token.delete`). 200 when nothing failed, 207 when some tokens
/// could not be deleted (listed in `failed`). 503 `wallet_index_building`, nothing deleted, while
/// the wallet index is still being backfilled (it could not find every token yet).
#[utoipa::path(delete, path = "/v1/tokens", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(WalletDeleteParams, IdempotencyKeyHeader),
    responses(
        (status = 200, description = "Every live token of the customer (up to 50 per call, see `complete`) is deleted; `deleted` is empty when nothing was left", body = WalletDeletion),
        (status = 207, description = "Some tokens could not be deleted (`failed`, with their problem codes); the others are deleted. Not kept for idempotent replay: a retry, with the same `Idempotency-Key` or none, deletes what is left", body = WalletDeletion),
        codes::WalletDeleteProblems,
    ))]
pub async fn delete_customer_tokens(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = match wallet_query(query.as_deref(), false) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    // The decoded reference, so two spellings of one query are the same request.
    let parts: [&[u8]; 3] = [b"DELETE", b"/v1/tokens", q.customer.as_bytes()];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let done = match state
            .services
            .delete_customer_tokens(&merchant, &q.customer)
            .await
        {
            Ok(d) => d,
            Err(e) => return ApiError::from(e).into(),
        };
        // Each token's outcome in the trail, as a single delete records it.
        for id in &done.deleted {
            audit::record_best_effort(
                &state,
                &ctx,
                &merchant.id,
                AuditAction::TokenDelete,
                audit::Subject::Token(id.as_str()),
                SUCCESS.to_owned(),
            )
            .await;
        }
        let mut failed = Vec::with_capacity(done.failed.len());
        for (id, e) in done.failed {
            let e = ApiError::from(e);
            audit::record_best_effort(
                &state,
                &ctx,
                &merchant.id,
                AuditAction::TokenDelete,
                audit::Subject::Token(id.as_str()),
                e.code.to_owned(),
            )
            .await;
            failed.push(WalletDeleteFailure {
                id: id.to_string(),
                status: e.status.as_u16(),
                code: e.code,
                detail: e.detail,
            });
        }
        let finished = failed.is_empty() && done.complete;
        let status = if failed.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::MULTI_STATUS
        };
        let mut reply = Reply::json(
            status,
            &WalletDeletion {
                customer_reference: q.customer.clone(),
                deleted: done.deleted.iter().map(ToString::to_string).collect(),
                failed,
                complete: done.complete,
            },
        );
        // Only a finished job's answer is kept for replay. After failures or a partial call the
        // key is released, so retrying with it continues the job instead of replaying its
        // first, unfinished answer (the 5xx rule of `run_idempotent`, for the same reason).
        reply.sensitive = !finished;
        reply
    })
    .await
}
