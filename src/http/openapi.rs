//! The OpenAPI 3.1 document of the API, generated from the code and served at
//! `GET /openapi.json`.
//!
//! Why generated with `utoipa` rather than written by hand: the schemas come from the very DTOs
//! the handlers serialize (src/http/dto.rs, the `Problem` body in src/http/problem.rs) and each
//! operation is declared on its handler (`#[utoipa::path]`), so a changed field or a new status
//! is one edit away from the document instead of a second file to remember. What the macros
//! cannot prove (that a handler really answers what its annotation says, that every routed
//! handler is annotated) is checked by tests/it/openapi.rs against a running gateway.
//!
//! This module also holds the security schemes. The other OpenAPI-only pieces sit below the
//! handlers that use them: the shared parameters (`params.rs`) and the schemas of the enums used
//! on the wire (`schemas.rs`, so the domain knows nothing of OpenAPI).

use std::sync::LazyLock;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Security scheme of the merchant routes: `Authorization: Bearer <merchant API key>`.
pub const MERCHANT_API_KEY: &str = "merchantApiKey";
/// Security scheme: a TLS client certificate bound to the merchant (src/http/auth/client_cert.rs).
pub const CLIENT_CERTIFICATE: &str = "clientCertificate";
/// Security scheme of the admin routes: `Authorization: Bearer <admin token>`.
pub const ADMIN_TOKEN: &str = "adminToken";
/// Security scheme of the issuer routes: `Authorization: Bearer <issuer API key>`.
pub const ISSUER_API_KEY: &str = "issuerApiKey";
/// D1's client credentials at `POST /oauth2/token` (HTTP Basic).
pub const D1_CLIENT_BASIC: &str = "d1ClientBasic";
/// The access token D1 sends to `notify-update`.
pub const D1_ACCESS_TOKEN: &str = "d1AccessToken";

/// The document. Operations are listed here once; their content lives on the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokengate",
        description = "Network-tokenization gateway: tokenize cards with Thales D1, keep PANs \
            encrypted, serve token credentials and cryptograms. Errors are \
            `application/problem+json` with a stable `code` (see the `Problem` schema). Every \
            response carries `x-request-id`; every POST accepts `Idempotency-Key`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::handlers::tokens::healthz,
        super::handlers::tokens::readyz,
        openapi_json,
        super::telemetry::metrics,
        super::handlers::tokens::create_merchant,
        super::handlers::tokens::create_token,
        super::handlers::tokens::get_token,
        super::handlers::wallets::list_customer_tokens,
        super::handlers::wallets::delete_customer_tokens,
        super::handlers::tokens::delete_token,
        super::handlers::tokens::create_cryptogram,
        super::handlers::tokens::suspend_token,
        super::handlers::tokens::resume_token,
        super::handlers::recurring::put_agreement,
        super::handlers::recurring::get_agreement,
        super::handlers::recurring::end_agreement,
        super::handlers::webhooks::create_endpoint,
        super::handlers::webhooks::list_endpoints,
        super::handlers::webhooks::get_endpoint,
        super::handlers::webhooks::delete_endpoint,
        super::handlers::webhooks::update_endpoint,
        super::handlers::webhooks::rotate_secret,
        super::handlers::webhooks::list_events,
        super::handlers::webhooks::get_event,
        super::handlers::webhooks::redeliver_event,
        super::handlers::audit_events::list_audit_events,
        super::handlers::audit_events::list_issuer_audit_events,
        super::handlers::reveal::reveal_card,
        super::handlers::keys::create_api_key,
        super::handlers::keys::list_api_keys,
        super::handlers::keys::revoke_api_key,
        super::handlers::client_certs::get_client_certs,
        super::handlers::client_certs::put_client_certs,
        super::handlers::client_certs::get_issuer_client_certs,
        super::handlers::client_certs::put_issuer_client_certs,
        super::handlers::keys::create_api_key_for_merchant,
        super::handlers::notify::oauth_token,
        super::handlers::notify::notify_update,
        super::handlers::issuers::create_issuer,
        super::handlers::issuers::list_issuers,
        super::handlers::issuers::get_issuer,
        super::handlers::issuers::create_issuer_key,
        super::handlers::issuers::get_operation,
        super::handlers::issuers::list_operations,
        super::handlers::issuer_cards::get_card,
        super::handlers::issuer_cards::delete_card,
        super::handlers::click_to_pay::enrol,
        super::handlers::click_to_pay::update_card,
        super::handlers::click_to_pay::update_consumer,
        super::handlers::click_to_pay::opt_out_card,
        super::handlers::click_to_pay::opt_out_consumer,
        super::handlers::click_to_pay::card_profiles,
        super::handlers::click_to_pay::consumer_profiles,
        super::handlers::production_orders::order_card,
        super::handlers::production_orders::order_batch,
        super::handlers::production_orders::production_status,
        super::handlers::webhooks::issuer_create_endpoint,
        super::handlers::webhooks::issuer_list_endpoints,
        super::handlers::webhooks::issuer_delete_endpoint,
        super::handlers::webhooks::issuer_list_events,
        super::handlers::issuer_notify::notify_cards,
        super::handlers::issuer_notify::notify_consumers,
    ),
    components(schemas(super::problem::ProblemBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "tokens", description = "Tokenize cards; read, suspend, resume and delete tokens; customer wallets; cryptograms; recurring agreements"),
        (name = "merchants", description = "Merchant onboarding, and API keys for an existing merchant (admin)"),
        (name = "webhooks", description = "Merchant webhook endpoints and the event log"),
        (name = "audit", description = "The merchant's audit trail"),
        (name = "api-keys", description = "A merchant's API keys and their scopes"),
        (name = "d1", description = "Called by Thales D1: OAuth client credentials and token lifecycle notifications"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "issuers", description = "Issuer onboarding and issuer API keys (admin)"),
        (name = "issuer", description = "The issuer side of D1: asynchronous operations, cards, Click to Pay, physical card orders (issuer API keys)"),
    )
)]
pub struct ApiDoc;

/// The serialized document, built once per process (it depends only on the code).
static DOCUMENT: LazyLock<String> =
    LazyLock::new(|| ApiDoc::openapi().to_json().unwrap_or_default());

/// The serialized document: what `GET /openapi.json` answers and `tokengate openapi` prints.
pub fn document() -> &'static str {
    DOCUMENT.as_str()
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses(
    (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json",
        body = Object),
))]
pub async fn openapi_json() -> Response {
    let mut resp = (StatusCode::OK, DOCUMENT.as_str()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Adds the security schemes (the derive has no syntax for them).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            MERCHANT_API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tgk_...")
                    .description(Some(
                        "The merchant API key returned once by `POST /v1/merchants`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            ISSUER_API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tgk_...")
                    .description(Some(
                        "An issuer API key, returned once by `POST /v1/issuers` (docs/issuer.md).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (`admin.token`, `TOKENGATE_ADMIN_TOKEN`).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            D1_CLIENT_BASIC,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "D1's client id and secret (`notify.client_id`, `notify.client_secret`).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            CLIENT_CERTIFICATE,
            SecurityScheme::MutualTls {
                description: Some(
                    "A TLS client certificate bound to the merchant (`PUT /v1/merchants/{id}/client-certs`). \
                     Per merchant: `API_KEY` (the key alone), `API_KEY_AND_CERT` (both, and they must name the \
                     same merchant) or `CERT` (the certificate alone, with the scopes bound to it). \
                     See docs/security.md, \"Client certificates\"."
                        .to_owned(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
        // Every merchant operation also accepts the certificate (alone, in `CERT` mode): the
        // alternative is added here rather than on each handler's annotation.
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let Some(security) = op.security.as_mut() else {
                    continue;
                };
                let merchant = security.iter().any(|r| {
                    serde_json::to_value(r)
                        .ok()
                        .and_then(|v| v.get(MERCHANT_API_KEY).cloned())
                        .is_some()
                });
                if merchant {
                    security.push(SecurityRequirement::new(
                        CLIENT_CERTIFICATE,
                        Vec::<String>::new(),
                    ));
                }
            }
        }
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            D1_ACCESS_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An access token from `POST /oauth2/token`."))
                    .build(),
            ),
        );
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::from_str(&DOCUMENT).unwrap()
    }

    #[test]
    fn document_is_openapi_3_1_with_components() {
        let d = doc();
        assert_eq!(d["openapi"], "3.1.0");
        assert_eq!(d["info"]["version"], env!("CARGO_PKG_VERSION"));
        let schemas = &d["components"]["schemas"];
        for name in [
            "Problem",
            "Token",
            "Card",
            "NetworkToken",
            "Cryptogram",
            "MerchantCreated",
            "CreateTokenRequest",
            "CardInput",
            "CreateCryptogramRequest",
            "Amount",
            "Usage",
            "Brand",
            "TransactionType",
            "Health",
        ] {
            assert!(schemas[name].is_object(), "schema {name} missing");
        }
        let schemes = &d["components"]["securitySchemes"];
        assert_eq!(schemes[MERCHANT_API_KEY]["scheme"], "bearer");
        assert_eq!(schemes[ADMIN_TOKEN]["scheme"], "bearer");
    }

    #[test]
    fn enum_schemas_use_the_wire_names() {
        let d = doc();
        let s = &d["components"]["schemas"];
        assert_eq!(
            s["Usage"]["enum"],
            serde_json::json!(["CARD_ON_FILE", "ONE_OFF", "RECURRING"])
        );
        assert_eq!(
            s["TransactionType"]["enum"],
            serde_json::json!(["CIT", "MIT"])
        );
        assert_eq!(
            s["Frequency"]["enum"],
            serde_json::json!([
                "DAILY",
                "WEEKLY",
                "MONTHLY",
                "QUARTERLY",
                "YEARLY",
                "UNSCHEDULED"
            ])
        );
        assert_eq!(s["Brand"]["enum"].as_array().unwrap().len(), 8);
        assert!(
            s["Brand"]["enum"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("MASTERCARD"))
        );
    }

    #[test]
    fn card_number_is_a_string_and_only_the_test_pan_is_an_example() {
        let d = doc();
        let number = &d["components"]["schemas"]["CardInput"]["properties"]["number"];
        assert_eq!(number["type"], "string");
        // No example anywhere in the document may look like a PAN, except the well-known test
        // PAN: scan every run of 12+ digits in the serialized document.
        let text = DOCUMENT.as_str();
        let mut run = String::new();
        for c in text.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_digit() {
                run.push(c);
            } else {
                if run.len() >= 12 {
                    assert_eq!(run, "4111111111111111", "PAN-like digits in the document");
                }
                run.clear();
            }
        }
        assert!(text.contains("4111111111111111"));
    }

    #[test]
    fn protected_operations_name_their_scheme() {
        let d = doc();
        let op = &d["paths"]["/v1/tokens"]["post"];
        assert_eq!(op["security"][0][MERCHANT_API_KEY], serde_json::json!([]));
        let op = &d["paths"]["/v1/merchants"]["post"];
        assert_eq!(op["security"][0][ADMIN_TOKEN], serde_json::json!([]));
        assert!(d["paths"]["/healthz"]["get"]["security"].is_null());
    }

    #[test]
    fn merchant_operations_also_accept_a_client_certificate_admin_ones_do_not() {
        let d = doc();
        assert_eq!(
            d["components"]["securitySchemes"][CLIENT_CERTIFICATE]["type"],
            "mutualTLS"
        );
        for (path, method) in [("/v1/tokens", "post"), ("/v1/tokens/{id}", "get")] {
            let sec = &d["paths"][path][method]["security"];
            assert_eq!(sec[0][MERCHANT_API_KEY], serde_json::json!([]), "{path}");
            assert_eq!(sec[1][CLIENT_CERTIFICATE], serde_json::json!([]), "{path}");
        }
        let admin = d["paths"]["/v1/merchants"]["post"]["security"].to_string();
        assert!(!admin.contains(CLIENT_CERTIFICATE), "{admin}");
    }
}
