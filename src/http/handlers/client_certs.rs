//! The admin routes that bind client certificates to merchants and issuers: `GET` and
//! `PUT /v1/merchants/{id}/client-certs`, `GET` and `PUT /v1/issuers/{id}/client-certs`
//! (docs/api.md, "Client certificates"; the rules are in `domain::client_certs`).

use crate::domain::apikeys::{Scopes, TenantKind, parse_scopes_for};
use crate::domain::audit::{AuditAction, AuditTenant, SUCCESS};
use crate::domain::client_certs::{
    BoundCert, CertAuthMode, CertFingerprint, ClientCertError, ClientCertPolicy,
};
use crate::domain::issuer::IssuerId;
use crate::domain::token::MerchantId;
use crate::http::audit::{self, AuditCtx};
use crate::http::auth::AdminAuth;
use crate::http::dto::rfc3339;
use crate::http::extract::{Body, parse_json};
use crate::http::idempotency::Reply;
use crate::http::params::PathId;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How the merchant's requests authenticate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[schema(as = ClientCertAuthMode)]
pub enum AuthModeDto {
    /// The API key authenticates; no certificate needed (the default).
    ApiKey,
    /// An API key of the merchant and one of its certificates, on every request.
    ApiKeyAndCert,
    /// The certificate alone (no `Authorization` header), with its binding's scopes; with an API
    /// key too, the key must be the merchant's. A key alone is refused.
    Cert,
}

impl From<AuthModeDto> for CertAuthMode {
    fn from(m: AuthModeDto) -> Self {
        match m {
            AuthModeDto::ApiKey => CertAuthMode::ApiKey,
            AuthModeDto::ApiKeyAndCert => CertAuthMode::ApiKeyAndCert,
            AuthModeDto::Cert => CertAuthMode::Cert,
        }
    }
}

impl From<CertAuthMode> for AuthModeDto {
    fn from(m: CertAuthMode) -> Self {
        match m {
            CertAuthMode::ApiKey => AuthModeDto::ApiKey,
            CertAuthMode::ApiKeyAndCert => AuthModeDto::ApiKeyAndCert,
            CertAuthMode::Cert => AuthModeDto::Cert,
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientCertInput {
    /// SHA-256 of the certificate's DER: 64 hex digits, `:` separators allowed (the output of
    /// `openssl x509 -noout -fingerprint -sha256`).
    #[schema(
        example = "3F:1C:0A:9D:2B:7E:4C:5A:8F:6D:1E:2B:3F:1C:0A:9D:2B:7E:4C:5A:8F:6D:1E:2B:3F:1C:0A:9D:2B:7E:4C:5A"
    )]
    sha256: String,
    /// For people, e.g. the host that holds it; up to 100 characters.
    #[serde(default)]
    name: Option<String>,
    /// What a request authenticated by this certificate alone (`CERT` mode, merchants only) may
    /// do. Default: the scopes of the tenant's first API key (merchants: all but `card:reveal`).
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// The whole binding of a merchant, replacing the previous one.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutClientCertsRequest {
    auth_mode: AuthModeDto,
    /// Up to 20; empty unbinds every certificate (then `authMode` must be `API_KEY`).
    certificates: Vec<ClientCertInput>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ClientCert)]
pub struct ClientCertView {
    /// 64 lowercase hex digits.
    sha256: String,
    name: String,
    scopes: Vec<&'static str>,
}

/// A merchant's or an issuer's client certificates and authentication mode.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ClientCertPolicy)]
pub struct ClientCertPolicyView {
    /// The merchant (merchant routes).
    #[serde(skip_serializing_if = "Option::is_none")]
    merchant_id: Option<String>,
    /// The issuer (issuer routes).
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer_id: Option<String>,
    auth_mode: AuthModeDto,
    certificates: Vec<ClientCertView>,
    /// `null`: never set (API keys only).
    #[schema(value_type = Option<String>, format = DateTime)]
    updated_at: Option<String>,
}

impl From<&ClientCertPolicy> for ClientCertPolicyView {
    fn from(p: &ClientCertPolicy) -> Self {
        let (merchant_id, issuer_id) = match AuditTenant::of_tenant_id(&p.merchant_id) {
            AuditTenant::Merchant(m) => (Some(m.as_str().to_owned()), None),
            AuditTenant::Issuer(i) => (None, Some(i.as_str().to_owned())),
        };
        ClientCertPolicyView {
            merchant_id,
            issuer_id,
            auth_mode: p.mode.into(),
            certificates: p
                .certificates
                .iter()
                .map(|c| ClientCertView {
                    sha256: c.sha256.as_str().to_owned(),
                    name: c.name.clone(),
                    scopes: c.scopes.iter().map(|s| s.as_str()).collect(),
                })
                .collect(),
            updated_at: (p.updated_at != OffsetDateTime::UNIX_EPOCH).then(|| rfc3339(p.updated_at)),
        }
    }
}

fn merchant_id(id: &str) -> Result<MerchantId, ApiError> {
    MerchantId::parse(id)
        .ok_or_else(|| ApiError::of(&codes::MERCHANT_NOT_FOUND, "no such merchant"))
}

fn to_policy(
    m: MerchantId,
    kind: TenantKind,
    req: PutClientCertsRequest,
) -> Result<ClientCertPolicy, ApiError> {
    let mut certificates = Vec::with_capacity(req.certificates.len());
    for (i, c) in req.certificates.into_iter().enumerate() {
        let sha256 = CertFingerprint::parse(&c.sha256).ok_or_else(|| {
            ApiError::of(&codes::INVALID_CLIENT_CERT_FINGERPRINT, format!("`certificates[{i}].sha256`: give the SHA-256 of the certificate's DER as 64 hex digits"),
            )
        })?;
        let scopes = match (&c.scopes, kind) {
            (Some(names), _) => parse_scopes_for(names, kind).map_err(ApiError::from)?,
            (None, TenantKind::Merchant) => Scopes::default_for_merchant_key(),
            (None, TenantKind::Issuer) => Scopes::default_for_issuer_key(),
        };
        certificates.push(BoundCert {
            sha256,
            name: c.name.as_deref().unwrap_or("").trim().to_owned(),
            scopes,
        });
    }
    Ok(ClientCertPolicy {
        merchant_id: m,
        mode: req.auth_mode.into(),
        certificates,
        updated_at: OffsetDateTime::now_utc(),
    })
}

/// A merchant's client certificates and authentication mode (`API_KEY` with no certificate
/// when none was ever set).
#[utoipa::path(get, path = "/v1/merchants/{id}/client-certs", tag = "merchants",
    security(("adminToken" = [])),
    params(PathId),
    responses(
        (status = 200, description = "The merchant's binding", body = ClientCertPolicyView),
        codes::ClientCertProblems,
    ))]
pub async fn get_client_certs(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(id): Path<String>,
) -> Response {
    let m = match merchant_id(&id) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match state.client_certs.get(&m).await {
        Ok(p) => Reply::json(StatusCode::OK, &ClientCertPolicyView::from(&p)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Replaces a merchant's client certificates and authentication mode. Applies on this instance
/// at once, on others within `auth.api_key_cache_ttl_ms`. Idempotent.
#[utoipa::path(put, path = "/v1/merchants/{id}/client-certs", tag = "merchants",
    security(("adminToken" = [])),
    params(PathId),
    request_body = PutClientCertsRequest,
    responses(
        (status = 200, description = "The merchant's binding as stored", body = ClientCertPolicyView),
        codes::ClientCertProblems,
    ))]
pub async fn put_client_certs(
    State(state): State<AppState>,
    _admin: AdminAuth,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(body): Body,
) -> Response {
    let result: Result<ClientCertPolicy, ApiError> = async {
        let m = merchant_id(&id)?;
        let req: PutClientCertsRequest = parse_json(&body)?;
        let policy = to_policy(m, TenantKind::Merchant, req)?;
        state
            .client_certs
            .put(policy)
            .await
            .map_err(|e: ClientCertError| ApiError::from(e))
    }
    .await;
    match result {
        Ok(p) => {
            // Recorded when it applied, as merchant creation is (docs/security.md).
            let ctx = AuditCtx::admin(audit::request_id(&headers));
            audit::record_best_effort(
                &state,
                &ctx,
                &p.merchant_id,
                AuditAction::ClientCertsUpdate,
                audit::Subject::None,
                SUCCESS.to_owned(),
            )
            .await;
            tracing::info!(merchant_id = %p.merchant_id, auth_mode = p.mode.as_str(),
                certificates = p.certificates.len(), "client certificates of a merchant set");
            Reply::json(StatusCode::OK, &ClientCertPolicyView::from(&p)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The issuer a path names, found (`issuer_not_found` otherwise).
async fn issuer(state: &AppState, id: &str) -> Result<crate::domain::issuer::Issuer, ApiError> {
    let id = IssuerId::parse(id)
        .ok_or_else(|| ApiError::of(&codes::ISSUER_NOT_FOUND, "no such issuer"))?;
    state.issuers.get_issuer(&id).await.map_err(ApiError::from)
}

/// An issuer's client certificates and authentication mode (`API_KEY` with no certificate
/// when none was ever set).
#[utoipa::path(get, path = "/v1/issuers/{id}/client-certs", tag = "issuers",
    security(("adminToken" = [])),
    params(("id" = String, Path, description = "The issuer's id (`iss_...`)")),
    responses(
        (status = 200, description = "The issuer's binding", body = ClientCertPolicyView),
        codes::IssuerClientCertProblems,
    ))]
pub async fn get_issuer_client_certs(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(id): Path<String>,
) -> Response {
    let result = match issuer(&state, &id).await {
        Ok(i) => state
            .client_certs
            .get_for_issuer(&i)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(p) => Reply::json(StatusCode::OK, &ClientCertPolicyView::from(&p)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Replaces an issuer's client certificates and authentication mode (`API_KEY` or
/// `API_KEY_AND_CERT`: an issuer's requests always carry an issuer API key). With
/// `API_KEY_AND_CERT`, every issuer key needs one of the certificates on the connection.
/// Applies on this instance at once, on others within `auth.api_key_cache_ttl_ms`. Idempotent.
#[utoipa::path(put, path = "/v1/issuers/{id}/client-certs", tag = "issuers",
    security(("adminToken" = [])),
    params(("id" = String, Path, description = "The issuer's id (`iss_...`)")),
    request_body = PutClientCertsRequest,
    responses(
        (status = 200, description = "The issuer's binding as stored", body = ClientCertPolicyView),
        codes::IssuerClientCertProblems,
    ))]
pub async fn put_issuer_client_certs(
    State(state): State<AppState>,
    _admin: AdminAuth,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(body): Body,
) -> Response {
    let found = match issuer(&state, &id).await {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let result: Result<ClientCertPolicy, ApiError> = async {
        let req: PutClientCertsRequest = parse_json(&body)?;
        let policy = to_policy(found.id.tenant(), TenantKind::Issuer, req)?;
        state
            .client_certs
            .put_for_issuer(&found, policy)
            .await
            .map_err(ApiError::from)
    }
    .await;
    // In the issuer's trail, refusals too (the issuer exists): who tried to change its
    // authentication is worth keeping.
    let ctx = AuditCtx::admin(audit::request_id(&headers));
    audit::record_best_effort(
        &state,
        &ctx,
        &found.id,
        AuditAction::ClientCertsUpdate,
        audit::Subject::None,
        audit::outcome(&result),
    )
    .await;
    match result {
        Ok(p) => {
            tracing::info!(issuer_id = %found.id, auth_mode = p.mode.as_str(),
                certificates = p.certificates.len(), "client certificates of an issuer set");
            Reply::json(StatusCode::OK, &ClientCertPolicyView::from(&p)).into_response()
        }
        Err(e) => e.into_response(),
    }
}
