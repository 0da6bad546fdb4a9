//! Integration tests: the D1 simulator over real sockets with mutual TLS, driven by a raw HTTP
//! client (not the crate's D1 client, so the simulator is checked against the protocol
//! document on its own).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokengate_cards::luhn_valid;
use tokengate_d1_protocol::devkeys::DevMaterial;
use tokengate_d1_protocol::jose::{self, AssertionClaims, Es256Signer};
use tokengate_d1_protocol::tls;
use tokengate_d1_sim::{NotifyTarget, SimConfig, SimHandle, Simulator};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const MGID: &str = "mgw-sim-test";
const TEST_PAN: &str = "4111111111111111";

/// A started simulator with its key material.
pub(crate) struct Sim {
    pub(crate) m: DevMaterial,
    pub(crate) handle: SimHandle,
    pub(crate) http: reqwest::Client,
}

pub(crate) async fn start_sim() -> Result<Sim> {
    let m = DevMaterial::generate(MGID)?;
    let cfg = SimConfig::from_dev_material(&m, MGID);
    let api = TcpListener::bind("127.0.0.1:0").await?;
    let control = TcpListener::bind("127.0.0.1:0").await?;
    let handle = Simulator::start(cfg, api, control).await?;
    // Plain HTTP to the control API; reqwest still wants a TLS backend, and this crate installs
    // no process-wide rustls provider.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls::client_config(&m.ca_cert_pem, None)?)
        .timeout(Duration::from_secs(10))
        .build()?;
    Ok(Sim { m, handle, http })
}

/// A client trusting the simulator's CA, presenting `identity` (cert, key) if given.
fn tls_client(ca_pem: &str, identity: Option<(&str, &str)>, h2: bool) -> Result<reqwest::Client> {
    let mut cfg = tls::client_config(ca_pem, identity)?;
    if !h2 {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .timeout(Duration::from_secs(10));
    if !h2 {
        b = b.http1_only();
    }
    Ok(b.build()?)
}

pub(crate) fn gateway_client(m: &DevMaterial) -> Result<reqwest::Client> {
    tls_client(
        &m.ca_cert_pem,
        Some((&m.gateway_client_cert_pem, &m.gateway_client_key_pem)),
        true,
    )
}

pub(crate) fn correlation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Status, headers and JSON body (`Null` when empty or not JSON).
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Value,
}

impl Answer {
    pub(crate) fn error_code(&self) -> &str {
        self.body["errorCode"].as_str().unwrap_or("")
    }
}

pub(crate) async fn answer(resp: reqwest::Response) -> Result<Answer> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await?;
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Posts a token request with `assertion`.
async fn token_request(
    client: &reqwest::Client,
    sim: &SimHandle,
    assertion: &str,
) -> Result<Answer> {
    let resp = client
        .post(format!("{}/oauth2/token", sim.base_url()))
        .header("x-correlation-id", correlation_id())
        .json(&json!({
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": assertion,
        }))
        .send()
        .await?;
    answer(resp).await
}

fn signer(m: &DevMaterial) -> Result<Es256Signer> {
    Ok(Es256Signer::from_pkcs8_pem(
        &m.gateway_es256_key_pem,
        &m.es256_kid,
    )?)
}

fn valid_assertion(s: &Sim) -> Result<String> {
    Ok(signer(&s.m)?.sign_assertion(MGID, &s.handle.base_url(), Duration::from_secs(300))?)
}

/// A D1 API session: mTLS client plus a bearer token.
pub(crate) struct Api {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
    pub(crate) token: String,
}

impl Api {
    pub(crate) async fn login(s: &Sim) -> Result<Api> {
        Api::login_with(s, gateway_client(&s.m)?).await
    }

    async fn login_with(s: &Sim, client: reqwest::Client) -> Result<Api> {
        let a = token_request(&client, &s.handle, &valid_assertion(s)?).await?;
        ensure!(
            a.status == StatusCode::OK,
            "token request: {} {}",
            a.status,
            a.body
        );
        let token = a.body["access_token"]
            .as_str()
            .context("access_token")?
            .to_owned();
        Ok(Api {
            client,
            base: format!("{}/merchant-gateways/{MGID}", s.handle.base_url()),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer> {
        let resp = self.send(method, path, body).await?;
        answer(resp).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("x-correlation-id", correlation_id())
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Answer> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Result<Answer> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn merchant(&self) -> Result<String> {
        let a = self
            .post("/merchants", json!({"merchantName": "Acme"}))
            .await?;
        ensure!(
            a.status == StatusCode::CREATED,
            "onboard: {} {}",
            a.status,
            a.body
        );
        Ok(a.body["merchantId"]
            .as_str()
            .context("merchantId")?
            .to_owned())
    }
}

/// A card expiry two years ahead, `MMYY`.
pub(crate) fn future_expiry() -> String {
    let year = time::OffsetDateTime::now_utc().year() + 2;
    format!("12{:02}", year % 100)
}

fn card_jwe(m: &DevMaterial, pan: &str) -> Result<String> {
    let key = jose::public_key_from_pem(&m.d1_jwe_pub_pem)?;
    let plaintext = json!({"pan": pan, "exp": future_expiry()}).to_string();
    Ok(jose::jwe_encrypt(
        plaintext.as_bytes(),
        &key,
        &m.d1_jwe_kid,
    )?)
}

async fn create_token(
    api: &Api,
    m: &DevMaterial,
    merchant: &str,
    request_id: &str,
) -> Result<Answer> {
    api.post(
        &format!("/merchants/{merchant}/tokens"),
        json!({
            "requestId": request_id,
            "usage": "CARD_ON_FILE",
            "encryptedData": card_jwe(m, TEST_PAN)?,
        }),
    )
    .await
}

/// The decrypted cryptogram response.
struct Credentials {
    token_number: String,
    token_expiry: String,
    cryptogram: Vec<u8>,
    eci: String,
}

async fn cryptogram(
    api: &Api,
    m: &DevMaterial,
    token_path: &str,
    kind: &str,
) -> Result<Credentials> {
    let a = api
        .post(
            &format!("{token_path}/transactions"),
            json!({"transactionType": kind, "amount": {"value": 1299, "currency": "EUR"}}),
        )
        .await?;
    ensure!(
        a.status == StatusCode::CREATED,
        "transaction: {} {}",
        a.status,
        a.body
    );
    ensure!(
        a.body["cryptogramExpiryDate"]
            .as_str()
            .is_some_and(|d| time::OffsetDateTime::parse(
                d,
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()),
        "cryptogramExpiryDate: {}",
        a.body
    );
    let secret = jose::secret_key_from_pem(&m.gateway_jwe_key_pem)?;
    let kid = m.gateway_jwe_kid.clone();
    let (got_kid, plaintext) = jose::jwe_decrypt(
        a.body["encryptedData"].as_str().context("encryptedData")?,
        &|k| (k == kid).then(|| secret.clone()),
    )?;
    ensure!(got_kid == m.gateway_jwe_kid);
    let v: Value = serde_json::from_slice(&plaintext)?;
    Ok(Credentials {
        token_number: v["tokenNumber"].as_str().context("tokenNumber")?.to_owned(),
        token_expiry: v["tokenExpiryDate"]
            .as_str()
            .context("tokenExpiryDate")?
            .to_owned(),
        cryptogram: STANDARD.decode(v["cryptogram"].as_str().context("cryptogram")?)?,
        eci: a.body["eci"].as_str().context("eci")?.to_owned(),
    })
}

/// Control API helpers.
pub(crate) async fn control(
    s: &Sim,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Answer> {
    let mut req = s
        .http
        .request(method, format!("{}{path}", s.handle.control_url()));
    if let Some(body) = body {
        req = req.json(&body);
    }
    answer(req.send().await?).await
}

pub(crate) async fn put_faults(s: &Sim, faults: Value) -> Result<()> {
    let a = control(s, reqwest::Method::PUT, "/sim/faults", Some(faults)).await?;
    ensure!(
        a.status == StatusCode::OK,
        "faults: {} {}",
        a.status,
        a.body
    );
    Ok(())
}

async fn clear_faults(s: &Sim) -> Result<()> {
    let a = control(s, reqwest::Method::DELETE, "/sim/faults", None).await?;
    ensure!(a.status == StatusCode::OK);
    Ok(())
}

pub(crate) async fn stats(s: &Sim) -> Result<Value> {
    Ok(control(s, reqwest::Method::GET, "/sim/stats", None)
        .await?
        .body)
}

async fn event(s: &Sim, token_id: &str, body: Value) -> Result<Answer> {
    control(
        s,
        reqwest::Method::POST,
        &format!("/sim/tokens/{token_id}/events"),
        Some(body),
    )
    .await
}

// ------------------------------------------------------------------------------------------
// A notification receiver standing in for the gateway.
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Received {
    path: String,
    authorization: Option<String>,
    correlation: Option<String>,
    body: Value,
}

struct ReceiverState {
    /// Answer 500 to this many notifications first.
    fail_first: AtomicUsize,
    /// Client credentials expected on `/oauth2/token`, if OAuth is in play.
    oauth: Option<(String, String)>,
    token_requests: AtomicUsize,
    tx: mpsc::UnboundedSender<Received>,
}

const GATEWAY_TOKEN: &str = "gw-access-token-1";

struct Receiver {
    base_url: String,
    state: Arc<ReceiverState>,
    rx: mpsc::UnboundedReceiver<Received>,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(fail_first: usize, oauth: Option<(&str, &str)>) -> Result<Receiver> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(ReceiverState {
            fail_first: AtomicUsize::new(fail_first),
            oauth: oauth.map(|(a, b)| (a.to_owned(), b.to_owned())),
            token_requests: AtomicUsize::new(0),
            tx,
        });
        let app = axum::Router::new()
            .route(
                "/merchant-gateways/{mgid}/merchants/{merchant}/tokens/{token}/notify-update",
                post(notify_update),
            )
            .route("/oauth2/token", post(gateway_token))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver {
            base_url,
            state,
            rx,
            _server: server,
        })
    }

    fn target(&self) -> NotifyTarget {
        NotifyTarget {
            base_url: self.base_url.clone(),
            ca_pem: None,
            client_identity: None,
            oauth: self
                .state
                .oauth
                .as_ref()
                .map(|(id, secret)| (id.clone(), SecretString::from(secret.clone()))),
        }
    }

    async fn next(&mut self) -> Result<Received> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .context("no notification within 10 s")?
            .context("receiver closed")
    }

    /// Asserts nothing more arrives for a while.
    async fn quiet(&mut self, wait: Duration) -> Result<()> {
        if let Ok(Some(r)) = tokio::time::timeout(wait, self.rx.recv()).await {
            bail!("unexpected notification: {r:?}");
        }
        Ok(())
    }
}

async fn notify_update(
    State(st): State<Arc<ReceiverState>>,
    Path((mgid, merchant, token)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if st.oauth.is_some() && authorization.as_deref() != Some(&format!("Bearer {GATEWAY_TOKEN}")) {
        return StatusCode::UNAUTHORIZED;
    }
    let _ = st.tx.send(Received {
        path: format!("{mgid}/{merchant}/{token}"),
        authorization,
        correlation: headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    let fail = st
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

async fn gateway_token(
    State(st): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, axum::Json<Value>) {
    st.token_requests.fetch_add(1, Ordering::SeqCst);
    let Some((id, secret)) = &st.oauth else {
        return (StatusCode::NOT_FOUND, axum::Json(Value::Null));
    };
    let expected = format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));
    let ok = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
        && body == "grant_type=client_credentials";
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        );
    }
    (
        StatusCode::OK,
        axum::Json(
            json!({"access_token": GATEWAY_TOKEN, "expires_in": 300, "token_type": "Bearer"}),
        ),
    )
}

/// A session with a merchant and an ACTIVE token; returns (api, merchant id, token object).
async fn with_token(s: &Sim, request_id: &str) -> Result<(Api, String, Value)> {
    let api = Api::login(s).await?;
    let merchant = api.merchant().await?;
    let a = create_token(&api, &s.m, &merchant, request_id).await?;
    ensure!(
        a.status == StatusCode::CREATED,
        "create: {} {}",
        a.status,
        a.body
    );
    Ok((api, merchant, a.body))
}

fn token_id(token: &Value) -> Result<String> {
    Ok(token["tokenId"].as_str().context("tokenId")?.to_owned())
}

// ------------------------------------------------------------------------------------------
// OAuth and transport
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn oauth_issues_tokens_for_valid_es256_assertions() -> Result<()> {
    let s = start_sim().await?;
    let client = gateway_client(&s.m)?;
    let a = token_request(&client, &s.handle, &valid_assertion(&s)?).await?;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["expires_in"], 900);
    assert_eq!(a.body["token_type"], "Bearer");
    let first = a.body["access_token"].as_str().context("token")?.to_owned();
    assert!(!first.is_empty());
    let b = token_request(&client, &s.handle, &valid_assertion(&s)?).await?;
    assert_ne!(
        b.body["access_token"].as_str(),
        Some(first.as_str()),
        "tokens are random"
    );
    assert_eq!(stats(&s).await?["oauthTokensIssued"], 2);
    assert_eq!(stats(&s).await?["requests"]["oauth"], 2);
    s.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn oauth_refuses_bad_assertions() -> Result<()> {
    let s = start_sim().await?;
    let other = DevMaterial::generate(MGID)?;
    let client = gateway_client(&s.m)?;
    let aud = s.handle.base_url();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = |iat: i64, exp: i64| AssertionClaims {
        iss: MGID.into(),
        sub: MGID.into(),
        aud: aud.clone(),
        iat,
        exp,
        jti: correlation_id(),
    };
    let es256_key = jsonwebtoken::EncodingKey::from_ec_pem(s.m.gateway_es256_key_pem.as_bytes())?;
    let mut es256_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    es256_header.kid = Some(s.m.es256_kid.clone());

    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(s.m.es256_kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims(now, now + 300),
        &jsonwebtoken::EncodingKey::from_secret(b"shared secret"),
    )?;
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD
            .encode(json!({"alg": "none", "typ": "JWT", "kid": s.m.es256_kid}).to_string()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(now, now + 300))?)
    );
    let expired = jsonwebtoken::encode(&es256_header, &claims(now - 1200, now - 300), &es256_key)?;
    let too_long = signer(&s.m)?.sign_assertion(MGID, &aud, Duration::from_secs(3600))?;
    let unknown_iss =
        signer(&s.m)?.sign_assertion("someone-else", &aud, Duration::from_secs(300))?;
    let unknown_kid = Es256Signer::from_pkcs8_pem(&s.m.gateway_es256_key_pem, "kid-nobody-knows")?
        .sign_assertion(MGID, &aud, Duration::from_secs(300))?;
    // Right kid, wrong key: the signature does not verify.
    let wrong_key = Es256Signer::from_pkcs8_pem(&other.gateway_es256_key_pem, &s.m.es256_kid)?
        .sign_assertion(MGID, &aud, Duration::from_secs(300))?;
    let wrong_aud =
        signer(&s.m)?.sign_assertion(MGID, "urn:somewhere", Duration::from_secs(300))?;

    for (name, assertion) in [
        ("HS256", hs256),
        ("none", none),
        ("expired", expired),
        ("too long", too_long),
        ("unknown iss", unknown_iss),
        ("unknown kid", unknown_kid),
        ("wrong key", wrong_key),
        ("wrong aud", wrong_aud),
        ("garbage", "not.a.jwt".to_owned()),
    ] {
        let a = token_request(&client, &s.handle, &assertion).await?;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{name}: {}", a.body);
        assert_eq!(a.error_code(), "AUTHORIZER_UNAUTHORIZED", "{name}");
        assert_eq!(a.body["retryable"], false, "{name}");
    }
    assert_eq!(stats(&s).await?["oauthTokensIssued"], 0);
    Ok(())
}

#[tokio::test]
async fn oauth_body_and_correlation_id_are_validated() -> Result<()> {
    let s = start_sim().await?;
    let client = gateway_client(&s.m)?;
    let url = format!("{}/oauth2/token", s.handle.base_url());
    let assertion = valid_assertion(&s)?;
    let grant = "urn:ietf:params:oauth:grant-type:jwt-bearer";
    let cases = [
        (
            json!({"grant_type": grant, "assertion": assertion, "scope": "x"}),
            "INVALID_FIELD",
        ),
        (json!({"grant_type": grant}), "MISSING_FIELD"),
        (json!({"assertion": assertion}), "MISSING_FIELD"),
        (
            json!({"grant_type": "client_credentials", "assertion": assertion}),
            "INVALID_FIELD",
        ),
        (json!(["not", "an", "object"]), "INVALID_FIELD"),
    ];
    for (body, code) in cases {
        let a = answer(
            client
                .post(&url)
                .header("x-correlation-id", correlation_id())
                .json(&body)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.body);
        assert_eq!(a.error_code(), code, "{body}");
    }
    let good = json!({"grant_type": grant, "assertion": assertion});
    let missing = answer(client.post(&url).json(&good).send().await?).await?;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.error_code(), "MISSING_FIELD");
    for bad in ["has space", "semi;colon", &"x".repeat(65)] {
        let a = answer(
            client
                .post(&url)
                .header("x-correlation-id", bad)
                .json(&good)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(a.error_code(), "INVALID_FIELD", "{bad}");
    }
    let ok = token_request(&client, &s.handle, &assertion).await?;
    assert_eq!(ok.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn mutual_tls_is_required() -> Result<()> {
    let s = start_sim().await?;
    let assertion = valid_assertion(&s)?;

    let anonymous = tls_client(&s.m.ca_cert_pem, None, true)?;
    let r = token_request(&anonymous, &s.handle, &assertion).await;
    assert!(
        r.is_err(),
        "a client without a certificate must not get through"
    );

    // A certificate from another CA (the client still trusts the simulator's server CA).
    let other = DevMaterial::generate(MGID)?;
    let foreign = tls_client(
        &s.m.ca_cert_pem,
        Some((
            &other.gateway_client_cert_pem,
            &other.gateway_client_key_pem,
        )),
        true,
    )?;
    let r = token_request(&foreign, &s.handle, &assertion).await;
    assert!(r.is_err(), "a certificate from another CA must be refused");

    // The same request with the right certificate, over h2 and HTTP/1.1.
    for h2 in [true, false] {
        let client = tls_client(
            &s.m.ca_cert_pem,
            Some((&s.m.gateway_client_cert_pem, &s.m.gateway_client_key_pem)),
            h2,
        )?;
        let resp = client
            .post(format!("{}/oauth2/token", s.handle.base_url()))
            .header("x-correlation-id", correlation_id())
            .json(&json!({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}))
            .send()
            .await?;
        let expected = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(resp.version(), expected);
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(stats(&s).await?["oauthTokensIssued"], 2);
    Ok(())
}

#[tokio::test]
async fn api_requires_a_valid_bearer_token() -> Result<()> {
    let s = start_sim().await?;
    let client = gateway_client(&s.m)?;
    let url = format!("{}/merchant-gateways/{MGID}/merchants", s.handle.base_url());
    let body = json!({"merchantName": "Acme"});
    let none = answer(
        client
            .post(&url)
            .header("x-correlation-id", correlation_id())
            .json(&body)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.error_code(), "AUTHORIZER_UNAUTHORIZED");
    let bogus = answer(
        client
            .post(&url)
            .header("x-correlation-id", correlation_id())
            .bearer_auth("made-up")
            .json(&body)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(bogus.status, StatusCode::UNAUTHORIZED);

    let api = Api::login(&s).await?;
    assert!(api.merchant().await?.len() <= 64);
    // Another merchant gateway's path is not ours.
    let a = api
        .client
        .post(format!(
            "{}/merchant-gateways/someone-else/merchants",
            s.handle.base_url()
        ))
        .header("x-correlation-id", correlation_id())
        .bearer_auth(&api.token)
        .json(&body)
        .send()
        .await?;
    assert_eq!(a.status(), StatusCode::NOT_FOUND);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Tokens and cryptograms
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_lifecycle_and_cryptograms() -> Result<()> {
    let s = start_sim().await?;
    let (api, merchant, token) = with_token(&s, "tok_lifecycle_1").await?;
    assert_eq!(token["status"], "ACTIVE");
    assert_eq!(token["requestId"], "tok_lifecycle_1");
    assert_eq!(token["cardBin"], "411111");
    assert_eq!(token["cardLastDigits"], "1111");
    assert_eq!(token["cardExpiryDate"], future_expiry());
    assert_eq!(token["par"].as_str().map(str::len), Some(29));
    let token_expiry = token["tokenExpiryDate"]
        .as_str()
        .context("tokenExpiryDate")?;
    assert_eq!(token_expiry.len(), 4);
    let id = token_id(&token)?;
    let path = format!("/merchants/{merchant}/tokens/{id}");

    // Idempotent on requestId: the same token, 200, no second token minted.
    let again = create_token(&api, &s.m, &merchant, "tok_lifecycle_1").await?;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["tokenId"], id.as_str());
    assert_eq!(stats(&s).await?["tokensCreated"], 1);

    // Get and find.
    let got = api.get(&path).await?;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, token);
    let found = api
        .get(&format!(
            "/merchants/{merchant}/tokens?requestId=tok_lifecycle_1"
        ))
        .await?;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(found.body["tokenId"], id.as_str());
    let missing = api
        .get(&format!(
            "/merchants/{merchant}/tokens?requestId=tok_never_sent"
        ))
        .await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error_code(), "NOT_FOUND");

    // Cryptograms: token PAN under the simulator's BIN, Luhn-valid, fresh each time.
    let c1 = cryptogram(&api, &s.m, &path, "CIT").await?;
    let c2 = cryptogram(&api, &s.m, &path, "MIT").await?;
    assert_eq!(c1.token_number.len(), 16);
    assert!(c1.token_number.starts_with("489537"));
    assert!(luhn_valid(c1.token_number.as_bytes()));
    assert_ne!(c1.token_number, TEST_PAN);
    assert_eq!(
        Some(&c1.token_number[12..]),
        token["tokenLastDigits"].as_str()
    );
    assert_eq!(c1.token_expiry, token_expiry);
    assert_eq!(c1.cryptogram.len(), 20);
    assert_eq!(c2.token_number, c1.token_number);
    assert_ne!(c1.cryptogram, c2.cryptogram, "a fresh cryptogram per call");
    assert_eq!(c1.eci, "05");
    assert_eq!(c2.eci, "07");

    // Suspend: no cryptogram; resume: cryptograms again.
    let suspended = api
        .post(&format!("{path}/suspend"), json!({"reason": "fraud check"}))
        .await?;
    assert_eq!(suspended.status, StatusCode::OK);
    assert_eq!(suspended.body["status"], "SUSPENDED");
    let refused = api
        .post(
            &format!("{path}/transactions"),
            json!({"transactionType": "CIT"}),
        )
        .await?;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.error_code(), "INVALID_STATE");
    let resumed = api.post(&format!("{path}/resume"), json!({})).await?;
    assert_eq!(resumed.body["status"], "ACTIVE");
    cryptogram(&api, &s.m, &path, "CIT").await?;

    // Delete is terminal; a repeat is fine.
    let deleted = api.call(reqwest::Method::DELETE, &path, None).await?;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.body["status"], "DELETED");
    let deleted = api.call(reqwest::Method::DELETE, &path, None).await?;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.body["status"], "DELETED");
    for action in ["suspend", "resume"] {
        let a = api.post(&format!("{path}/{action}"), json!({})).await?;
        assert_eq!(a.status, StatusCode::CONFLICT, "{action}");
        assert_eq!(a.error_code(), "INVALID_STATE");
    }
    let refused = api
        .post(
            &format!("{path}/transactions"),
            json!({"transactionType": "MIT"}),
        )
        .await?;
    assert_eq!(refused.status, StatusCode::CONFLICT);

    // Another merchant cannot see the token.
    let other = api.merchant().await?;
    let a = api.get(&format!("/merchants/{other}/tokens/{id}")).await?;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    let st = stats(&s).await?;
    assert_eq!(st["requests"]["createTransaction"], 5);
    assert_eq!(st["requests"]["delete"], 2);
    Ok(())
}

#[tokio::test]
async fn token_creation_validates_input() -> Result<()> {
    let s = start_sim().await?;
    let api = Api::login(&s).await?;
    let merchant = api.merchant().await?;
    let path = format!("/merchants/{merchant}/tokens");
    let non_luhn = "4111111111111112";
    let foreign_jwe = card_jwe(&DevMaterial::generate(MGID)?, TEST_PAN)?;
    let cases = [
        (
            json!({"requestId": "tok_a", "usage": "CARD_ON_FILE", "encryptedData": "not-a-jwe"}),
            "INVALID_FIELD",
        ),
        (
            json!({"requestId": "tok_b", "usage": "CARD_ON_FILE", "encryptedData": card_jwe(&s.m, non_luhn)?}),
            "INVALID_FIELD",
        ),
        (
            // Encrypted to a key this D1 does not hold.
            json!({"requestId": "tok_c", "usage": "CARD_ON_FILE", "encryptedData": foreign_jwe}),
            "INVALID_FIELD",
        ),
        (
            json!({"requestId": "tok_d", "usage": "CARD_ON_FILE"}),
            "MISSING_FIELD",
        ),
        (
            json!({"requestId": "tok_e", "usage": "SOMETIMES", "encryptedData": card_jwe(&s.m, TEST_PAN)?}),
            "INVALID_FIELD",
        ),
        (
            json!({"requestId": "bad id!", "usage": "ONE_OFF", "encryptedData": card_jwe(&s.m, TEST_PAN)?}),
            "INVALID_FIELD",
        ),
    ];
    for (body, code) in cases {
        let a = api.post(&path, body.clone()).await?;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.body);
        assert_eq!(a.error_code(), code, "{body}");
        assert!(
            !a.body.to_string().contains(non_luhn),
            "an error never echoes a PAN"
        );
        assert!(
            !a.body.to_string().contains(TEST_PAN),
            "an error never echoes a PAN"
        );
    }
    let unknown = api
        .post(
            "/merchants/mer_unknown/tokens",
            json!({"requestId": "tok_f", "usage": "ONE_OFF", "encryptedData": card_jwe(&s.m, TEST_PAN)?}),
        )
        .await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(stats(&s).await?["tokensCreated"], 0);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Notifications
// ------------------------------------------------------------------------------------------

fn is_timestamp(v: &Value) -> bool {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    v.as_str()
        .is_some_and(|t| time::PrimitiveDateTime::parse(t, &format).is_ok())
}

#[tokio::test]
async fn control_events_are_notified_and_redelivered() -> Result<()> {
    let s = start_sim().await?;
    // The receiver answers 500 to the first notification: it must come again.
    let mut rcv = Receiver::start(1, Some(("sim-client", "s3cret"))).await?;
    s.handle.set_notify_target(rcv.target());
    let (api, merchant, token) = with_token(&s, "tok_notify_1").await?;
    let id = token_id(&token)?;

    let a = event(
        &s,
        &id,
        json!({"type": "SUSPEND", "reason": "ISSUER_DECISION"}),
    )
    .await?;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "SUSPENDED");

    let first = rcv.next().await?;
    let second = rcv.next().await?;
    assert_eq!(first.path, format!("{MGID}/{merchant}/{id}"));
    assert_eq!(
        first.body, second.body,
        "a redelivery carries the same event"
    );
    assert_eq!(
        first.authorization.as_deref(),
        Some("Bearer gw-access-token-1")
    );
    assert!(first.correlation.is_some());
    let b = &first.body;
    assert!(b["eventId"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(b["eventType"], "STATUS_UPDATE");
    assert!(is_timestamp(&b["timestamp"]), "{}", b["timestamp"]);
    assert_eq!(b["tokenId"], id.as_str());
    assert_eq!(b["requestId"], "tok_notify_1");
    assert_eq!(b["status"], "SUSPENDED");
    assert_eq!(b["tokenLastDigits"], token["tokenLastDigits"]);
    assert_eq!(b["tokenExpiryDate"], token["tokenExpiryDate"]);
    assert_eq!(b["cardLastDigits"], "1111");
    assert_eq!(b["cardExpiryDate"], token["cardExpiryDate"]);
    assert_eq!(b["par"], token["par"]);
    assert_eq!(b["reason"], "ISSUER_DECISION");
    // The D1 API sees the change too.
    let path = format!("/merchants/{merchant}/tokens/{id}");
    assert_eq!(api.get(&path).await?.body["status"], "SUSPENDED");

    // RESUME, then RENEW: a new token PAN (last digits) and expiry.
    let a = event(&s, &id, json!({"type": "RESUME"})).await?;
    assert_eq!(a.body["status"], "ACTIVE");
    let resumed = rcv.next().await?;
    assert_eq!(resumed.body["status"], "ACTIVE");
    assert!(
        resumed.body["timestamp"].as_str() > first.body["timestamp"].as_str(),
        "later events have later timestamps"
    );
    let a = event(&s, &id, json!({"type": "RENEW", "expiry": "0931"})).await?;
    assert_eq!(a.status, StatusCode::OK);
    let renewal = rcv.next().await?;
    assert_eq!(renewal.body["eventType"], "RENEWAL");
    assert_eq!(renewal.body["tokenExpiryDate"], "0931");
    assert_eq!(renewal.body["cardExpiryDate"], "0931");
    let creds = cryptogram(&api, &s.m, &path, "CIT").await?;
    assert_eq!(
        Some(&creds.token_number[12..]),
        renewal.body["tokenLastDigits"].as_str()
    );
    assert_eq!(creds.token_expiry, "0931");

    // DELETE, then events on a deleted token are refused.
    let a = event(&s, &id, json!({"type": "DELETE"})).await?;
    assert_eq!(a.body["status"], "DELETED");
    assert_eq!(rcv.next().await?.body["status"], "DELETED");
    let a = event(&s, &id, json!({"type": "RESUME"})).await?;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let a = event(&s, "d1t_unknown", json!({"type": "SUSPEND"})).await?;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = event(&s, &id, json!({"type": "EXPLODE"})).await?;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    rcv.quiet(Duration::from_millis(300)).await?;

    let st = stats(&s).await?;
    assert_eq!(st["notificationsDelivered"], 4);
    assert_eq!(st["notificationAttempts"], 5);
    // The gateway token is fetched once and cached.
    assert_eq!(rcv.state.token_requests.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn duplicate_and_reordered_notifications() -> Result<()> {
    let s = start_sim().await?;
    let mut rcv = Receiver::start(0, None).await?;
    s.handle.set_notify_target(rcv.target());
    let (_api, _merchant, token) = with_token(&s, "tok_dup_1").await?;
    let id = token_id(&token)?;

    put_faults(&s, json!({"duplicateNotifications": true})).await?;
    event(&s, &id, json!({"type": "SUSPEND"})).await?;
    let a = rcv.next().await?;
    let b = rcv.next().await?;
    assert_eq!(a.body["eventId"], b.body["eventId"]);
    assert!(a.authorization.is_none());
    rcv.quiet(Duration::from_millis(300)).await?;

    put_faults(&s, json!({"reorderNotifications": true})).await?;
    event(&s, &id, json!({"type": "RESUME"})).await?;
    rcv.quiet(Duration::from_millis(300)).await?;
    event(&s, &id, json!({"type": "SUSPEND"})).await?;
    let later = rcv.next().await?;
    let earlier = rcv.next().await?;
    assert_eq!(
        later.body["status"], "SUSPENDED",
        "the newer event arrives first"
    );
    assert_eq!(earlier.body["status"], "ACTIVE");
    assert!(earlier.body["timestamp"].as_str() < later.body["timestamp"].as_str());

    // A held event is released when reordering is switched off.
    event(&s, &id, json!({"type": "RESUME"})).await?;
    rcv.quiet(Duration::from_millis(300)).await?;
    clear_faults(&s).await?;
    assert_eq!(rcv.next().await?.body["status"], "ACTIVE");
    Ok(())
}

#[tokio::test]
async fn asynchronous_tokenization_completes_with_a_notification() -> Result<()> {
    let s = start_sim().await?;
    let mut rcv = Receiver::start(0, None).await?;
    s.handle.set_notify_target(rcv.target());
    put_faults(&s, json!({"asyncTokenization": true})).await?;
    let api = Api::login(&s).await?;
    let merchant = api.merchant().await?;
    let a = create_token(&api, &s.m, &merchant, "tok_async_1").await?;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body["status"], "PENDING");
    let id = token_id(&a.body)?;
    assert!(
        a.body.get("par").is_none(),
        "details are absent while pending"
    );

    let n = rcv.next().await?;
    assert_eq!(n.body["eventType"], "TOKEN_CREATED");
    assert_eq!(n.body["status"], "ACTIVE");
    assert_eq!(n.body["tokenId"], id.as_str());
    assert_eq!(n.body["requestId"], "tok_async_1");
    let got = api
        .get(&format!("/merchants/{merchant}/tokens/{id}"))
        .await?;
    assert_eq!(got.body["status"], "ACTIVE");
    assert_eq!(got.body["tokenLastDigits"], n.body["tokenLastDigits"]);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Faults
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn injected_errors_latency_and_noise() -> Result<()> {
    let s = start_sim().await?;
    let (api, merchant, token) = with_token(&s, "tok_faults_1").await?;
    let id = token_id(&token)?;
    let path = format!("/merchants/{merchant}/tokens/{id}");

    put_faults(
        &s,
        json!({"errorRates": {"503": 1.0}, "retryAfterSeconds": 7, "operations": ["getToken"]}),
    )
    .await?;
    let doc = control(&s, reqwest::Method::GET, "/sim/faults", None).await?;
    assert_eq!(doc.body["errorRates"]["503"], 1.0);
    assert_eq!(doc.body["operations"], json!(["getToken"]));
    let a = api.get(&path).await?;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.error_code(), "SERVICE_UNAVAILABLE");
    assert_eq!(a.body["retryable"], true);
    assert_eq!(
        a.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"7"[..])
    );
    // Other operations are not affected.
    let found = api
        .get(&format!(
            "/merchants/{merchant}/tokens?requestId=tok_faults_1"
        ))
        .await?;
    assert_eq!(found.status, StatusCode::OK);

    put_faults(
        &s,
        json!({"errorRates": {"429": 1.0}, "retryAfterSeconds": 2}),
    )
    .await?;
    let a = api.get(&path).await?;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        a.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );

    put_faults(&s, json!({"errorRates": {"500": 1.0}})).await?;
    let a = api.get(&path).await?;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.error_code(), "INTERNAL_ERROR");

    // Latency.
    clear_faults(&s).await?;
    let t0 = Instant::now();
    api.get(&path).await?;
    let baseline = t0.elapsed();
    put_faults(&s, json!({"latency": {"fixedMs": 400}})).await?;
    let t0 = Instant::now();
    let a = api.get(&path).await?;
    let slow = t0.elapsed();
    assert_eq!(a.status, StatusCode::OK);
    assert!(slow >= Duration::from_millis(400), "{slow:?}");
    assert!(slow > baseline);

    // Noise: unknown fields and enum values, known fields untouched.
    put_faults(&s, json!({"noise": true})).await?;
    let a = api.get(&path).await?;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body["futureField"].is_object(), "{}", a.body);
    assert_eq!(a.body["tokenType"], "NEW_KIND");
    assert_eq!(a.body["status"], "ACTIVE");
    assert_eq!(a.body["tokenId"], id.as_str());
    assert_eq!(a.body["par"], token["par"]);
    assert!(a.headers.contains_key("x-d1-future"));
    let e = api.get("/merchants/mer_unknown/tokens/nope").await?;
    assert_eq!(e.error_code(), "NOT_FOUND");
    assert!(e.body["futureField"].is_object());
    let c = api
        .post(
            &format!("{path}/transactions"),
            json!({"transactionType": "CIT"}),
        )
        .await?;
    assert_eq!(c.body["cryptogramType"], "NEW_KIND");

    // Bad fault documents are refused.
    for bad in [
        json!({"resetRate": 2.0}),
        json!({"errorRates": {"418": 1.0}}),
        json!({"operations": ["fly"]}),
    ] {
        let a = control(&s, reqwest::Method::PUT, "/sim/faults", Some(bad.clone())).await?;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    clear_faults(&s).await?;
    let a = api.get(&path).await?;
    assert!(a.body.get("futureField").is_none());
    let st = stats(&s).await?;
    assert_eq!(st["requests"]["getToken"], 8);
    assert_eq!(st["requests"]["findToken"], 1);
    Ok(())
}

#[tokio::test]
async fn reset_closes_the_connection_without_a_response() -> Result<()> {
    let s = start_sim().await?;
    for h2 in [true, false] {
        let client = tls_client(
            &s.m.ca_cert_pem,
            Some((&s.m.gateway_client_cert_pem, &s.m.gateway_client_key_pem)),
            h2,
        )?;
        let api = Api::login_with(&s, client).await?;
        let merchant = api.merchant().await?;
        put_faults(
            &s,
            json!({"resetRate": 1.0, "operations": ["onboardMerchant"]}),
        )
        .await?;
        let r = api
            .send(
                reqwest::Method::POST,
                "/merchants",
                Some(json!({"merchantName": "Acme"})),
            )
            .await;
        let err = match r {
            Ok(resp) => bail!("expected no response (h2: {h2}), got {}", resp.status()),
            Err(e) => e,
        };
        assert!(!err.is_timeout(), "a reset is immediate, not a timeout");
        assert!(err.status().is_none());
        // Other operations, and the same one after the fault is cleared, work again.
        let a = api
            .get(&format!("/merchants/{merchant}/tokens?requestId=tok_none"))
            .await?;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        clear_faults(&s).await?;
        api.merchant().await?;
    }
    Ok(())
}

#[tokio::test]
async fn timeout_holds_the_request_and_does_not_block_shutdown() -> Result<()> {
    let s = start_sim().await?;
    let api = Api::login(&s).await?;
    put_faults(
        &s,
        json!({"timeoutRate": 1.0, "operations": ["onboardMerchant"]}),
    )
    .await?;
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_millis(800),
        api.send(
            reqwest::Method::POST,
            "/merchants",
            Some(json!({"merchantName": "Acme"})),
        ),
    )
    .await;
    assert!(r.is_err(), "no answer while the request is held");
    assert!(t0.elapsed() >= Duration::from_millis(800));
    // Start another held request, then shut down: shutdown must not wait the 30 s hold out.
    let held = tokio::spawn(async move {
        api.send(
            reqwest::Method::POST,
            "/merchants",
            Some(json!({"merchantName": "Acme"})),
        )
        .await
        .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    s.handle.shutdown().await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let outcome = tokio::time::timeout(Duration::from_secs(10), held).await??;
    assert!(
        outcome.is_err(),
        "the held request gets no answer: {outcome:?}"
    );
    Ok(())
}
