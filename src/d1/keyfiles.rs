//! The D1 client's key material: loaded from `d1.keys_dir` in production, or taken from
//! generated development material in sandbox mode.
//!
//! Only what the gateway itself must hold is here: our mTLS identity, the CA that D1's server
//! certificate chains to, our ES256 assertion key, D1's public JWE key, our private JWE key.
//! File names are those [`DevMaterial::write_to`] uses, so a directory written by it works as
//! a `keys_dir` too (against a separately started simulator):
//!
//! | file                     | content                                          |
//! |--------------------------|--------------------------------------------------|
//! | `ca.pem`                 | CA bundle for D1's server certificate            |
//! | `gateway-client.pem`     | our client certificate chain (from D1's CA)      |
//! | `gateway-client-key.pem` | its private key                                  |
//! | `gateway-es256-key.pem`  | PKCS#8 P-256 key signing our OAuth assertions    |
//! | `d1-jwe-pub.pem`         | D1's P-256 public key for card data              |
//! | `gateway-jwe-key.pem`    | our PKCS#8 P-256 key for data D1 encrypts to us  |
//!
//! Key ids come from configuration (`d1.es256_kid`, ...): D1 assigns them at onboarding.

use std::fmt;
use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

use super::client::D1Config;
use crate::config::{ConfigError, D1Section};
use tokengate_d1_protocol::devkeys::DevMaterial;

/// Key material of the D1 client. Private keys are `SecretString`; `Debug` shows only kids.
#[derive(Clone)]
pub struct D1KeyMaterial {
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: SecretString,
    pub es256_key_pem: SecretString,
    pub es256_kid: String,
    pub d1_jwe_public_pem: String,
    pub d1_jwe_kid: String,
    pub gateway_jwe_key_pem: SecretString,
    pub gateway_jwe_kid: String,
}

impl fmt::Debug for D1KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("D1KeyMaterial")
            .field("es256_kid", &self.es256_kid)
            .field("d1_jwe_kid", &self.d1_jwe_kid)
            .field("gateway_jwe_kid", &self.gateway_jwe_kid)
            .finish_non_exhaustive()
    }
}

/// Sandbox: the generated set, with its own key ids (the simulator registers the same ones).
impl From<DevMaterial> for D1KeyMaterial {
    fn from(m: DevMaterial) -> Self {
        D1KeyMaterial {
            ca_pem: m.ca_cert_pem.clone(),
            client_cert_pem: m.gateway_client_cert_pem.clone(),
            client_key_pem: SecretString::from(m.gateway_client_key_pem.as_str()),
            es256_key_pem: SecretString::from(m.gateway_es256_key_pem.as_str()),
            es256_kid: m.es256_kid.clone(),
            d1_jwe_public_pem: m.d1_jwe_pub_pem.clone(),
            d1_jwe_kid: m.d1_jwe_kid.clone(),
            gateway_jwe_key_pem: SecretString::from(m.gateway_jwe_key_pem.as_str()),
            gateway_jwe_kid: m.gateway_jwe_kid.clone(),
        }
    }
}

fn invalid(msg: String) -> ConfigError {
    ConfigError::Invalid {
        key: "d1.keys_dir",
        msg,
    }
}

/// Reads the files listed in the module docs from `dir`; key ids from `d1`. Errors name the
/// file and the problem, never its content. Keys are parsed here so a bad file stops start-up
/// with its name rather than failing later inside the client.
pub fn load(dir: &Path, d1: &D1Section) -> Result<D1KeyMaterial, ConfigError> {
    let read = |name: &str| -> Result<String, ConfigError> {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))
    };
    let m = D1KeyMaterial {
        ca_pem: read("ca.pem")?,
        client_cert_pem: read("gateway-client.pem")?,
        client_key_pem: SecretString::from(read("gateway-client-key.pem")?),
        es256_key_pem: SecretString::from(read("gateway-es256-key.pem")?),
        es256_kid: d1.es256_kid.clone(),
        d1_jwe_public_pem: read("d1-jwe-pub.pem")?,
        d1_jwe_kid: d1.d1_jwe_kid.clone(),
        gateway_jwe_key_pem: SecretString::from(read("gateway-jwe-key.pem")?),
        gateway_jwe_kid: d1.gateway_jwe_kid.clone(),
    };
    m.check()
        .map_err(|(file, why)| invalid(format!("{}: {why}", dir.join(file).display())))?;
    Ok(m)
}

impl D1KeyMaterial {
    /// Parses every item, reporting the first bad one as (file name, reason).
    fn check(&self) -> Result<(), (&'static str, String)> {
        use super::jose;
        use tokengate_d1_protocol::tls;
        tls::certs_from_pem(&self.ca_pem, "CA bundle").map_err(|e| ("ca.pem", e.to_string()))?;
        tls::certs_from_pem(&self.client_cert_pem, "client certificate")
            .map_err(|e| ("gateway-client.pem", e.to_string()))?;
        tls::key_from_pem(self.client_key_pem.expose_secret(), "client key")
            .map_err(|e| ("gateway-client-key.pem", e.to_string()))?;
        jose::Es256Signer::from_pkcs8_pem(self.es256_key_pem.expose_secret(), &self.es256_kid)
            .map_err(|e| ("gateway-es256-key.pem", e.to_string()))?;
        jose::public_key_from_pem(&self.d1_jwe_public_pem)
            .map_err(|e| ("d1-jwe-pub.pem", e.to_string()))?;
        jose::secret_key_from_pem(self.gateway_jwe_key_pem.expose_secret())
            .map_err(|e| ("gateway-jwe-key.pem", e.to_string()))?;
        Ok(())
    }
}

impl D1Config {
    /// Client configuration from the `[d1]` section and the key material.
    pub fn from_parts(base_url: String, d1: &D1Section, m: D1KeyMaterial) -> D1Config {
        D1Config {
            base_url,
            merchant_gateway_id: d1.merchant_gateway_id.clone(),
            es256_key_pem: m.es256_key_pem,
            es256_kid: m.es256_kid,
            d1_jwe_public_pem: m.d1_jwe_public_pem,
            d1_jwe_kid: m.d1_jwe_kid,
            gateway_jwe_key_pem: m.gateway_jwe_key_pem,
            gateway_jwe_kid: m.gateway_jwe_kid,
            client_cert_pem: m.client_cert_pem,
            client_key_pem: m.client_key_pem,
            ca_pem: m.ca_pem,
            paths: d1.paths.clone(),
            call_timeout: std::time::Duration::from_millis(d1.call_timeout_ms),
            max_retries: d1.max_retries,
            max_concurrency: d1.max_concurrency,
            connections: d1.connections,
            breaker_failure_threshold: d1.breaker_failure_threshold,
            breaker_open_for: std::time::Duration::from_millis(d1.breaker_open_ms),
        }
    }
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

    /// The embedded defaults, adjusted; built through the real loader so new config fields
    /// do not break this test.
    fn section() -> D1Section {
        let mut d1 = crate::config::Config::load_with_env(None, &[]).unwrap().d1;
        d1.merchant_gateway_id = "mgid-files".into();
        d1.es256_kid = "cfg-es".into();
        d1.d1_jwe_kid = "cfg-d1".into();
        d1.gateway_jwe_kid = "cfg-gw".into();
        d1.call_timeout_ms = 1234;
        d1.max_concurrency = 7;
        d1
    }

    #[test]
    fn loads_a_dev_directory_with_configured_kids() {
        let dir = tempfile::tempdir().unwrap();
        let dev = DevMaterial::generate("mgid-files").unwrap();
        dev.write_to(dir.path()).unwrap();
        let d1 = section();
        let m = load(dir.path(), &d1).unwrap();
        assert_eq!(m.es256_kid, "cfg-es");
        assert_eq!(m.client_cert_pem, dev.gateway_client_cert_pem);
        assert!(!format!("{m:?}").contains("PRIVATE"));
        let cfg = D1Config::from_parts("https://d1.example/authz/v1".into(), &d1, m);
        assert_eq!(cfg.call_timeout, std::time::Duration::from_millis(1234));
        assert_eq!(cfg.max_concurrency, 7);
        assert_eq!(cfg.gateway_jwe_kid, "cfg-gw");
        crate::d1::D1Client::new(cfg).unwrap();

        // Sandbox: the dev kids are kept.
        let m: D1KeyMaterial = dev.clone().into();
        assert_eq!(m.es256_kid, dev.es256_kid);
    }

    #[test]
    fn missing_or_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), &section()).unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
        DevMaterial::generate("m")
            .unwrap()
            .write_to(dir.path())
            .unwrap();
        std::fs::write(dir.path().join("gateway-jwe-key.pem"), "garbage").unwrap();
        let err = load(dir.path(), &section()).unwrap_err().to_string();
        assert!(err.contains("gateway-jwe-key.pem"), "{err}");
        assert!(!err.contains("garbage"));
    }
}
