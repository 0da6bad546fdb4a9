//! OpenAPI descriptions of the parameters several operations share (path ids, the
//! `Idempotency-Key` header, the wallet queries), for the handlers' `#[utoipa::path(params(...))]`.

use utoipa::IntoParams;
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};

/// The `Idempotency-Key` request header (src/http/idempotency.rs).
pub struct IdempotencyKeyHeader;

impl IntoParams for IdempotencyKeyHeader {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "1-255 printable ASCII characters, scoped per merchant: the same key with \
                     the same request replays the stored response (`idempotent-replayed: \
                     true`); with a different request it is refused (422 \
                     `idempotency_key_reused`).",
                ))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(255)),
                ))
                .build(),
        ]
    }
}

/// The `{id}` of other resources (`/v1/webhook-endpoints/{id}`, `/v1/events/{id}`).
pub struct PathId;

impl IntoParams for PathId {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The resource id."))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        ]
    }
}

/// The `{id}` of `/v1/tokens/{id}...`.
pub struct TokenIdPath;

impl IntoParams for TokenIdPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(
                    "The token id (`tok_...`). A malformed id answers 404 like an unknown one.",
                ))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .example(Some(serde_json::json!("tok_d7XXXyQu2WZRKlyWvsMJRA")))
                .build(),
        ]
    }
}

/// The `{id}` of `/v1/merchants/{id}/...`.
pub struct MerchantIdPath;

impl IntoParams for MerchantIdPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(
                    "The merchant id (`mer_...`). A malformed id answers 404 like an unknown one.",
                ))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .example(Some(serde_json::json!("mer_Xf2kQ9LmA0bC3dE4")))
                .build(),
        ]
    }
}

/// `customerReference` of the wallet routes (`GET`/`DELETE /v1/tokens`).
fn customer_reference_param() -> Parameter {
    ParameterBuilder::new()
        .name("customerReference")
        .parameter_in(ParameterIn::Query)
        .required(Required::True)
        .description(Some(
            "The customer whose tokens are meant: the `customerReference` given when the \
             tokens were created (1-128 printable characters, percent-encoded). Missing: 400 \
             `invalid_query`; malformed: 422 `invalid_customer_reference`.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(128)),
        ))
        .example(Some(serde_json::json!("cust-42")))
        .build()
}

/// The query of `GET /v1/tokens` (a customer's wallet).
pub struct WalletListParams;

impl IntoParams for WalletListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let status = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([
                "PENDING",
                "ACTIVE",
                "SUSPENDED",
                "INACTIVE",
                "EXPIRED",
                "DELETED",
                "OTHER",
            ]));
        vec![
            customer_reference_param(),
            ParameterBuilder::new()
                .name("status")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(
                    "Only tokens in this status (`OTHER`: any status D1 added). Without it, \
                     every status, `DELETED` tombstones included.",
                ))
                .schema(Some(status))
                .build(),
            ParameterBuilder::new()
                .name("limit")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some("Page size, 1 to 100 (default 20)."))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1))
                        .maximum(Some(100)),
                ))
                .build(),
            ParameterBuilder::new()
                .name("cursor")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(
                    "`nextCursor` of the previous page (anything else: 422 `invalid_cursor`).",
                ))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        ]
    }
}

/// The query of `DELETE /v1/tokens` (delete a customer's tokens).
pub struct WalletDeleteParams;

impl IntoParams for WalletDeleteParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![customer_reference_param()]
    }
}
