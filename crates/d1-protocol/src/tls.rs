//! rustls configuration shared by the gateway listener, the D1 client and the simulator.
//!
//! One place decides the TLS policy: the `ring` provider (the only one compiled in), TLS 1.2 and
//! 1.3 only (what D1 requires), certificates and keys from PEM. Client certificates, when
//! required, must chain to the configured CA. Only the gateway's own listener may also ask for
//! one without requiring it ([`ClientAuth::Optional`]); D1 and the simulator always require one.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built. Messages name the input, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: no PEM certificate found")]
    NoCertificate(&'static str),
    #[error("{0}: invalid PEM")]
    BadPem(&'static str),
    #[error("{0}: no usable PEM private key found")]
    NoPrivateKey(&'static str),
    #[error("{0}: {1}")]
    Rustls(&'static str, rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// The ring provider. Built per config rather than installed process-wide, so this crate never
/// fights another library over the global default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Parses every certificate in a PEM bundle (leaf first for a chain).
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::BadPem(what))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) in a PEM document.
pub fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::NoPrivateKey(what))
}

/// A root store holding every certificate of a PEM CA bundle.
pub fn root_store(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "CA bundle")? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Rustls("CA bundle", e))?;
    }
    Ok(roots)
}

/// Server configuration. With `client_ca_pem`, every client must present a certificate that
/// chains to that CA (mutual TLS); without it, no client certificate is asked for. `alpn_h2`
/// advertises `h2` before `http/1.1`; otherwise only `http/1.1`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    alpn_h2: bool,
) -> Result<ServerConfig, TlsError> {
    let client_auth = match client_ca_pem {
        Some(ca) => ClientAuth::Required(ca),
        None => ClientAuth::None,
    };
    server_config_with_client_auth(cert_pem, key_pem, client_auth, alpn_h2)
}

/// Which client certificates a server asks for.
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// None asked for.
    None,
    /// Asked for; a client without one is served, a client with one that does not chain to this
    /// CA bundle (PEM) is refused. Only the gateway's own listener offers this
    /// (`server.tls.require_client_cert = false` with a `client_ca_file`).
    Optional(&'a str),
    /// Required, chaining to this CA bundle (PEM): mutual TLS.
    Required(&'a str),
}

/// [`server_config`] with the client-certificate policy spelled out.
pub fn server_config_with_client_auth(
    cert_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth<'_>,
    alpn_h2: bool,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let certs = certs_from_pem(cert_pem, "server certificate")?;
    let key = key_from_pem(key_pem, "server key")?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Rustls("protocol versions", e))?;
    let builder = match client_auth {
        ClientAuth::Required(ca) | ClientAuth::Optional(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider);
            let verifier = if matches!(client_auth, ClientAuth::Optional(_)) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls("server certificate and key", e))?;
    config.alpn_protocols = if alpn_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// Client configuration trusting only `ca_pem` (not the system roots: D1 and the simulator
/// are pinned to their own CA). `identity` is the client certificate chain and key for mutual
/// TLS. ALPN offers `h2` and `http/1.1`.
///
/// hyper-rustls refuses a config with ALPN already set (it sets ALPN itself from the enabled
/// HTTP versions); clear `alpn_protocols` before handing the config to its builder.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Rustls("protocol versions", e))?
        .with_root_certificates(root_store(ca_pem)?);
    let mut config = match identity {
        Some((chain_pem, key_pem)) => builder
            .with_client_auth_cert(
                certs_from_pem(chain_pem, "client certificate")?,
                key_from_pem(key_pem, "client key")?,
            )
            .map_err(|e| TlsError::Rustls("client certificate and key", e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
// `allow`, not `expect`: whether clippy flags unwraps in tests depends on crate-level settings.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;
    use crate::devkeys::DevMaterial;

    #[test]
    fn configs_build_from_dev_material() {
        let m = DevMaterial::generate("mgid-test").unwrap();
        let s = server_config(
            &m.d1_server_cert_pem,
            &m.d1_server_key_pem,
            Some(&m.ca_cert_pem),
            true,
        )
        .unwrap();
        assert_eq!(s.alpn_protocols[0], b"h2");
        let s = server_config(
            &m.gateway_server_cert_pem,
            &m.gateway_server_key_pem,
            None,
            false,
        )
        .unwrap();
        assert_eq!(s.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let c = client_config(
            &m.ca_cert_pem,
            Some((&m.gateway_client_cert_pem, &m.gateway_client_key_pem)),
        )
        .unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
        let c = client_config(&m.ca_cert_pem, None).unwrap();
        assert!(!c.client_auth_cert_resolver.has_certs());
    }

    /// Drives a TLS handshake in memory; the first error either side raises, if any.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<(), rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn mutual_tls_handshakes_and_refusals() {
        let m = DevMaterial::generate("mgid-hs").unwrap();
        let server = || {
            server_config(
                &m.d1_server_cert_pem,
                &m.d1_server_key_pem,
                Some(&m.ca_cert_pem),
                true,
            )
            .unwrap()
        };
        let with_cert = client_config(
            &m.ca_cert_pem,
            Some((&m.gateway_client_cert_pem, &m.gateway_client_key_pem)),
        )
        .unwrap();
        handshake(with_cert, server()).unwrap();
        // No client certificate: the server refuses.
        let without = client_config(&m.ca_cert_pem, None).unwrap();
        assert!(handshake(without, server()).is_err());
        // A client certificate from another CA: refused.
        let other = DevMaterial::generate("mgid-hs").unwrap();
        let foreign = client_config(
            &m.ca_cert_pem,
            Some((
                &other.gateway_client_cert_pem,
                &other.gateway_client_key_pem,
            )),
        )
        .unwrap();
        assert!(handshake(foreign, server()).is_err());
        // A client that trusts another CA refuses the server.
        let distrustful = client_config(
            &other.ca_cert_pem,
            Some((
                &other.gateway_client_cert_pem,
                &other.gateway_client_key_pem,
            )),
        )
        .unwrap();
        assert!(handshake(distrustful, server()).is_err());
    }

    #[test]
    fn bad_pem_is_reported_without_content() {
        let m = DevMaterial::generate("mgid-test").unwrap();
        assert!(matches!(
            server_config("nope", &m.d1_server_key_pem, None, true),
            Err(TlsError::NoCertificate(_))
        ));
        let err = server_config(&m.d1_server_cert_pem, "nope", None, true).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey(_)));
        // A key that does not match the certificate.
        let err = server_config(&m.d1_server_cert_pem, &m.gateway_server_key_pem, None, true)
            .unwrap_err();
        assert!(!err.to_string().contains("PRIVATE KEY"));
        assert!(client_config("", None).is_err());
    }
}
