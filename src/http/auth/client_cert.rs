//! Client certificates (mutual TLS) in authentication (the rules are in
//! `domain::client_certs`; the admin routes that bind certificates to merchants are
//! `handlers::client_certs`).
//!
//! The HTTPS listener (`listener.rs`) puts a [`ClientCert`] into the extensions of every request
//! of a connection whose client presented a certificate (verified against
//! `server.tls.client_ca_file` during the handshake). [`super::MerchantAuth`] calls
//! [`check_with_key`] after an API key authenticated, and [`authenticate_without_key`] when the
//! request has no `Authorization` header at all; [`super::IssuerAuth`] calls
//! [`check_with_issuer_key`] after an issuer API key authenticated (the same rules, the
//! issuer's tenant id in the merchant's place).

use axum::http::header;
use axum::http::request::Parts;

use crate::domain::apikeys::{Caller, IssuerCaller};
use crate::domain::client_certs::{CertFingerprint, CertRefusal};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// The verified leaf certificate of the request's TLS connection (same for every request on it).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// SHA-256 of the certificate's DER.
    pub sha256: CertFingerprint,
}

impl ClientCert {
    pub fn from_der(der: &[u8]) -> ClientCert {
        ClientCert {
            sha256: CertFingerprint::of_der(der),
        }
    }
}

fn presented(parts: &Parts) -> Option<&CertFingerprint> {
    parts.extensions.get::<ClientCert>().map(|c| &c.sha256)
}

/// After an API key authenticated `caller`: refuses (403) a connection certificate bound to
/// another merchant, and a key used without one of its merchant's certificates when the
/// merchant requires one.
pub async fn check_with_key(
    parts: &Parts,
    state: &AppState,
    caller: &Caller,
) -> Result<(), ApiError> {
    state
        .client_certs
        .check_key(&caller.merchant.id, presented(parts))
        .await?
        .map_err(ApiError::from)
}

/// After an issuer API key authenticated `caller`: the refusals of [`check_with_key`] (a
/// certificate bound to another tenant, or none of the issuer's own when it requires one),
/// with the same codes.
pub async fn check_with_issuer_key(
    parts: &Parts,
    state: &AppState,
    caller: &IssuerCaller,
) -> Result<(), ApiError> {
    let refused = state
        .client_certs
        .check_key(&caller.issuer.id.tenant(), presented(parts))
        .await?;
    // Never says which tenant a certificate belongs to.
    refused.map_err(|r| match r {
        CertRefusal::Mismatch => ApiError::of(
            &codes::CLIENT_CERT_MISMATCH,
            "the client certificate of this connection is bound to another tenant than the API key",
        ),
        CertRefusal::Required => ApiError::of(
            &codes::CLIENT_CERT_REQUIRED,
            "this issuer requires one of its client certificates (mutual TLS) on every request",
        ),
    })
}

/// A request without an `Authorization` header: the caller its client certificate
/// authenticates alone (merchant in `CERT` mode), else 401.
pub async fn authenticate_without_key(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
    let missing = || {
        ApiError::of(
            &codes::UNAUTHORIZED,
            "send the merchant API key as `Authorization: Bearer <key>`",
        )
    };
    // A malformed `Authorization` header is a failed key, never a fallback to the certificate.
    if parts.headers.contains_key(header::AUTHORIZATION) {
        return Err(missing());
    }
    let Some(fp) = presented(parts) else {
        return Err(missing());
    };
    match state.client_certs.caller_for(fp).await? {
        Some(c) => Ok(c),
        None => Err(ApiError::of(
            &codes::UNAUTHORIZED,
            "send the merchant API key as `Authorization: Bearer <key>`; this client certificate does not authenticate alone",
        )),
    }
}
