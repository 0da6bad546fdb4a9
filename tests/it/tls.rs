//! The gateway's own HTTPS listener (`[server.tls]`), with real handshakes on real sockets:
//! HTTP/2 and HTTP/1.1 over TLS, mutual TLS (required and optional), the protocol floor
//! (a TLS 1.1 ClientHello gets a `protocol_version` alert; a TLS 1.2-only client works),
//! certificate reload on file change and on SIGHUP, and graceful shutdown with a request in
//! flight. Certificates come from `DevMaterial::generate` (a fresh CA per call).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Client, Version};
use serde_json::{Value, json};
use tokengate_d1_protocol::devkeys::DevMaterial;
use tokengate_d1_protocol::tls;

use crate::support::app::{ADMIN, Backend, TestApp, card_body};
use crate::support::issuer::{Iss, onboard};
use crate::support::tls::{
    ClientCerts, Files, client, gateway_identity, healthz, https, keeping_client, replace,
    start_mtls, start_with,
};

const MGID: &str = "tokengate-sandbox";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http2_and_http11_and_no_plain_http() {
    let m = DevMaterial::generate(MGID).unwrap();
    let (_files, app) = start_with(&m, &[]).await;

    let r = healthz(&client(&m.ca_cert_pem, None, false), app.addr)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), Version::HTTP_2, "ALPN h2");
    assert!(r.headers().contains_key("x-request-id"));
    let r = healthz(&client(&m.ca_cert_pem, None, true), app.addr)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), Version::HTTP_11);

    // The whole API is behind it, middleware included.
    let r = client(&m.ca_cert_pem, None, false)
        .post(https(app.addr, "/v1/merchants"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "Acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = keeping_client(&m.ca_cert_pem, None)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://127.0.0.1:{}/healthz", app.addr.port()))
        .send()
        .await;
    assert!(
        r.is_err(),
        "plain HTTP answered: {:?}",
        r.map(|r| r.status())
    );

    // A client that does not trust the gateway's CA refuses it.
    let other = DevMaterial::generate(MGID).unwrap();
    assert!(
        healthz(&client(&other.ca_cert_pem, None, false), app.addr)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_or_with_a_wrong_certificate() {
    let m = DevMaterial::generate(MGID).unwrap();
    let foreign = DevMaterial::generate(MGID).unwrap();
    let (_files, app) = start_mtls(&m, ClientCerts::Required).await;
    let (good, wrong) = (gateway_identity(&m), gateway_identity(&foreign));
    for http1 in [false, true] {
        let r = healthz(&client(&m.ca_cert_pem, good, http1), app.addr).await;
        assert_eq!(r.unwrap().status(), 200, "a client certificate from the CA");
        let r = healthz(&client(&m.ca_cert_pem, None, http1), app.addr).await;
        assert!(
            r.is_err(),
            "no client certificate was accepted (http1: {http1})"
        );
        let r = healthz(&client(&m.ca_cert_pem, wrong, http1), app.addr).await;
        assert!(
            r.is_err(),
            "a foreign client certificate was accepted (http1: {http1})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_are_verified_when_presented() {
    let m = DevMaterial::generate(MGID).unwrap();
    let foreign = DevMaterial::generate(MGID).unwrap();
    let (_files, app) = start_mtls(&m, ClientCerts::Optional).await;
    let r = healthz(&client(&m.ca_cert_pem, None, false), app.addr).await;
    assert_eq!(r.unwrap().status(), 200, "no certificate: served");
    let r = healthz(
        &client(&m.ca_cert_pem, gateway_identity(&m), false),
        app.addr,
    )
    .await;
    assert_eq!(r.unwrap().status(), 200);
    let wrong = gateway_identity(&foreign);
    let r = healthz(&client(&m.ca_cert_pem, wrong, false), app.addr).await;
    assert!(r.is_err(), "a foreign client certificate was accepted");
}

// --- the protocol floor -----------------------------------------------------------------------

fn push_u16(v: &mut Vec<u8>, n: usize) {
    v.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    push_u16(out, data.len());
    out.extend_from_slice(data);
}

/// A ClientHello record offering at most `version` (0x0302 = TLS 1.1), with no
/// supported_versions extension, as a TLS 1.1 stack sends it. `with_sig_algs` adds the
/// signature_algorithms extension, which a real TLS 1.1 client does not send, so that the
/// version check is the only reason left to refuse it.
fn client_hello(version: u16, with_sig_algs: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
    let suites: &[u16] = if version >= 0x0303 {
        // TLS_ECDHE_{ECDSA,RSA}_WITH_AES_128_GCM_SHA256: TLS 1.2 suites rustls supports.
        &[0xc02b, 0xc02f]
    } else {
        // TLS_ECDHE_{ECDSA,RSA}_WITH_AES_128_CBC_SHA, TLS_RSA_WITH_AES_{128,256}_CBC_SHA:
        // what a TLS 1.1 client can offer.
        &[0xc009, 0xc013, 0x002f, 0x0035]
    };
    push_u16(&mut body, suites.len() * 2);
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null only
    let mut exts = Vec::new();
    let host = b"localhost";
    let mut sni = Vec::new();
    push_u16(&mut sni, host.len() + 3);
    sni.push(0); // host_name
    push_u16(&mut sni, host.len());
    sni.extend_from_slice(host);
    extension(&mut exts, 0x0000, &sni);
    extension(&mut exts, 0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]); // x25519, P-256
    extension(&mut exts, 0x000b, &[0x01, 0x00]); // uncompressed points
    if with_sig_algs {
        // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        extension(
            &mut exts,
            0x000d,
            &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
        );
    }
    push_u16(&mut body, exts.len());
    body.extend_from_slice(&exts);

    let mut hs = vec![0x01]; // client_hello
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake, record version TLS 1.0
    push_u16(&mut record, hs.len());
    record.extend_from_slice(&hs);
    record
}

/// Sends `hello` over a raw socket and returns the first record the server answers with:
/// (content type, payload).
fn first_record(addr: SocketAddr, hello: &[u8]) -> (u8, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(hello).unwrap();
    let mut header = [0u8; 5];
    s.read_exact(&mut header).unwrap();
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (header[0], payload)
}

const ALERT: u8 = 0x15;
const FATAL: u8 = 2;
const PROTOCOL_VERSION: u8 = 70;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls11_is_refused_and_tls12_and_tls13_work() {
    let m = DevMaterial::generate(MGID).unwrap();
    let (_files, app) = start_with(&m, &[]).await;
    let addr = app.addr;

    let (kind, payload) =
        tokio::task::spawn_blocking(move || first_record(addr, &client_hello(0x0302, true)))
            .await
            .unwrap();
    assert_eq!(
        (kind, payload.as_slice()),
        (ALERT, [FATAL, PROTOCOL_VERSION].as_slice()),
        "a TLS 1.1 ClientHello must get a fatal protocol_version alert"
    );
    // As a real TLS 1.1 stack sends it (no signature_algorithms): refused with a fatal alert
    // too, never a ServerHello.
    let (kind, payload) =
        tokio::task::spawn_blocking(move || first_record(addr, &client_hello(0x0302, false)))
            .await
            .unwrap();
    assert_eq!(kind, ALERT, "answered a TLS 1.1 hello with {kind:#x}");
    assert_eq!(payload.first(), Some(&FATAL));
    // Control: the same hand-made hello offering TLS 1.2 is answered with a ServerHello, so the
    // alert above is about the version and not about how the hello is built.
    let (kind, payload) =
        tokio::task::spawn_blocking(move || first_record(addr, &client_hello(0x0303, true)))
            .await
            .unwrap();
    assert_eq!(
        kind, 0x16,
        "TLS 1.2 hello not answered with a handshake record: {payload:?}"
    );
    assert_eq!(payload.first(), Some(&0x02), "not a ServerHello");

    // rustls clients pinned to one version: both handshake, and that version is used.
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(tls::root_store(&m.ca_cert_pem).unwrap())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
    }
}

// --- reload ------------------------------------------------------------------------------------

/// Polls until a fresh handshake trusting `ca_pem` succeeds, or `within` passes.
async fn served_by(addr: SocketAddr, ca_pem: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = healthz(&client(ca_pem, None, false), addr).await
            && r.status() == 200
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_is_picked_up_without_restart() {
    let a = DevMaterial::generate(MGID).unwrap();
    let b = DevMaterial::generate(MGID).unwrap();
    let (files, app) =
        start_with(&a, &[("TOKENGATE__SERVER__TLS__RELOAD_INTERVAL_MS", "100")]).await;
    assert!(served_by(app.addr, &a.ca_cert_pem, Duration::ZERO).await);
    // A connection made before the swap keeps working after it.
    let kept = keeping_client(&a.ca_cert_pem, None).build().unwrap();
    assert_eq!(
        kept.get(https(app.addr, "/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    files.install_server(&b);
    assert!(
        served_by(app.addr, &b.ca_cert_pem, Duration::from_secs(10)).await,
        "the new certificate was not picked up"
    );
    assert!(
        healthz(&client(&a.ca_cert_pem, None, false), app.addr)
            .await
            .is_err(),
        "the old certificate is still served to new connections"
    );
    assert_eq!(
        kept.get(https(app.addr, "/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "an established connection was dropped by the reload"
    );

    // A broken renewal (key of another certificate) is refused and the current one stays.
    replace(&files.path("key.pem"), a.gateway_server_key_pem.as_bytes());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(served_by(app.addr, &b.ca_cert_pem, Duration::ZERO).await);
    // Fixed again: picked up.
    files.install_server(&a);
    assert!(served_by(app.addr, &a.ca_cert_pem, Duration::from_secs(10)).await);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let a = DevMaterial::generate(MGID).unwrap();
    let b = DevMaterial::generate(MGID).unwrap();
    // No polling: only SIGHUP can make it reload.
    let (files, app) = start_with(&a, &[("TOKENGATE__SERVER__TLS__RELOAD_INTERVAL_MS", "0")]).await;
    // Serving proves `Gateway::run` registered its SIGHUP handler (before it serves), so the
    // signal below cannot take the default action (terminating the test process).
    assert!(served_by(app.addr, &a.ca_cert_pem, Duration::from_secs(5)).await);

    files.install_server(&b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        served_by(app.addr, &a.ca_cert_pem, Duration::ZERO).await,
        "reloaded without a signal although polling is off"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        served_by(app.addr, &b.ca_cert_pem, Duration::from_secs(10)).await,
        "SIGHUP did not reload"
    );
}

// --- graceful shutdown ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_https_request_finish() {
    let m = DevMaterial::generate(MGID).unwrap();
    let files = Files::new();
    files.install_server(&m);
    // Sandbox mode with D1 (the in-process simulator), so a request can be made slow.
    let app = files
        .serve(TestApp::builder(Backend::Embedded))
        .start()
        .await;
    let c = keeping_client(&m.ca_cert_pem, None)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = c
        .post(https(app.addr, "/v1/merchants"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "Acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let key = r.json::<Value>().await.unwrap()["apiKey"]
        .as_str()
        .unwrap()
        .to_owned();
    app.sim_faults(json!({"latency": {"fixedMs": 1500}, "operations": ["createToken"]}))
        .await;

    let addr = app.addr;
    let slow = tokio::spawn({
        let c = c.clone();
        async move {
            c.post(https(addr, "/v1/tokens"))
                .bearer_auth(&key)
                .json(&card_body("4111111111111111", 12, 2030))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    let stopping = tokio::spawn(app.stop());
    let r = slow
        .await
        .unwrap()
        .expect("the in-flight request was cut off");
    assert_eq!(r.status(), 201);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown did not finish")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // And nothing is served any more.
    let r = c.get(https(addr, "/healthz")).send().await;
    assert!(r.is_err(), "still serving after shutdown");
}

// --- client certificates mapped to merchants -----------------------------------------------------

/// SHA-256 of the certificate's DER, as the admin API takes it.
fn fingerprint(cert_pem: &str) -> String {
    use sha2::Digest;
    let der = tls::certs_from_pem(cert_pem, "test certificate")
        .unwrap()
        .remove(0);
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

/// `AB:CD:...`, as `openssl x509 -fingerprint -sha256` prints it.
fn openssl_form(fp: &str) -> String {
    fp.to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

/// Onboards a merchant over `c`; (id, API key).
async fn merchant(c: &Client, base: &str, name: &str) -> (String, String) {
    let r = c
        .post(format!("{base}/v1/merchants"))
        .bearer_auth(ADMIN)
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let m: Value = r.json().await.unwrap();
    (
        m["id"].as_str().unwrap().to_owned(),
        m["apiKey"].as_str().unwrap().to_owned(),
    )
}

/// `PUT {tenant}/client-certs` as the admin (`tenant`: `/v1/merchants/{id}` or
/// `/v1/issuers/{id}`): the status and the body.
async fn put_tenant_certs(c: &Client, base: &str, tenant: &str, body: Value) -> (u16, Value) {
    let r = c
        .put(format!("{base}{tenant}/client-certs"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn put_certs(c: &Client, base: &str, merchant: &str, body: Value) -> (u16, Value) {
    put_tenant_certs(c, base, &format!("/v1/merchants/{merchant}"), body).await
}

/// `GET path` with `key` as the bearer (or none): the status and the body (`null` if not JSON).
async fn get_as(c: &Client, base: &str, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut rb = c.get(format!("{base}{path}"));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `GET /v1/api-keys` (any default-scoped key or a certificate with `keys`): the status, the
/// problem code if any, and the key ids listed (which tell whose keys they are).
async fn list_keys(c: &Client, base: &str, key: Option<&str>) -> (u16, Value) {
    get_as(c, base, "/v1/api-keys", key).await
}

/// Each `(tenant, body, (status, code))` PUT to `{tenant}/client-certs` as the admin, in order:
/// each must be refused with that status and problem code.
async fn refused_puts<const N: usize>(
    c: &Client,
    base: &str,
    cases: [(&str, Value, (u16, &str)); N],
) {
    for (tenant, body, (status, problem)) in cases {
        let what = format!("PUT {tenant}/client-certs {body}");
        let r = put_tenant_certs(c, base, tenant, body).await;
        assert_eq!(code(&r), (status, Some(problem)), "{what}");
    }
}

/// The status and the problem code (if any) of an answer.
fn code(r: &(u16, Value)) -> (u16, Option<&str>) {
    (r.0, r.1["code"].as_str())
}

fn key_ids(v: &Value) -> Vec<String> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_map_to_merchants_and_never_act_for_another() {
    let m = DevMaterial::generate(MGID).unwrap();
    // Optional client certificates: clients without one are served too.
    let (_files, app) = start_mtls(&m, ClientCerts::Optional).await;
    let base = https(app.addr, "");
    let (cert_a, key_pem_a) = m.issue_client_cert("psp-client-a").unwrap();
    let (cert_b, key_pem_b) = m.issue_client_cert("psp-client-b").unwrap();
    let (cert_u, key_pem_u) = m.issue_client_cert("psp-client-unmapped").unwrap();
    let with_a = client(&m.ca_cert_pem, Some((&cert_a, &key_pem_a)), false);
    let with_b = client(&m.ca_cert_pem, Some((&cert_b, &key_pem_b)), true);
    let with_u = client(&m.ca_cert_pem, Some((&cert_u, &key_pem_u)), false);
    let without = client(&m.ca_cert_pem, None, false);

    let (a, key_a) = merchant(&without, &base, "Merchant A").await;
    let (b, key_b) = merchant(&without, &base, "Merchant B").await;
    let (_, own_a) = list_keys(&without, &base, Some(&key_a)).await;
    let ids_a = key_ids(&own_a);

    // Nothing bound yet: API keys work with and without certificates, as before.
    assert_eq!(list_keys(&with_a, &base, Some(&key_a)).await.0, 200);
    assert_eq!(list_keys(&with_a, &base, Some(&key_b)).await.0, 200);
    assert_eq!(list_keys(&with_a, &base, None).await.0, 401);

    // Bind A's certificate to A (the openssl form of the fingerprint is accepted), with both a
    // key and the certificate required.
    let fp_a = fingerprint(&cert_a);
    let (status, body) = put_certs(
        &without,
        &base,
        &a,
        json!({"authMode": "API_KEY_AND_CERT",
               "certificates": [{"sha256": openssl_form(&fp_a), "name": "a-host"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["certificates"][0]["sha256"], fp_a.as_str());
    assert_eq!(body["authMode"], "API_KEY_AND_CERT");

    // A's certificate and A's key: served (HTTP/2).
    let (status, listed) = list_keys(&with_a, &base, Some(&key_a)).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(key_ids(&listed), ids_a);
    // A's certificate and B's key: refused, whatever B's mode.
    let r = list_keys(&with_a, &base, Some(&key_b)).await;
    assert_eq!(code(&r), (403, Some("client_cert_mismatch")));
    assert!(
        !r.1.to_string().contains(&a),
        "the refusal names a merchant: {}",
        r.1
    );
    // A's key without a certificate, or with one bound to nobody: A requires its certificate.
    assert_eq!(
        code(&list_keys(&without, &base, Some(&key_a)).await),
        (403, Some("client_cert_required"))
    );
    assert_eq!(
        code(&list_keys(&with_u, &base, Some(&key_a)).await),
        (403, Some("client_cert_required"))
    );
    // B (API_KEY mode) is unaffected: with an unbound certificate (HTTP/1.1) or none.
    assert_eq!(list_keys(&with_b, &base, Some(&key_b)).await.0, 200);
    assert_eq!(list_keys(&without, &base, Some(&key_b)).await.0, 200);
    // The certificate alone does not authenticate in this mode.
    assert_eq!(
        code(&list_keys(&with_a, &base, None).await),
        (401, Some("unauthorized"))
    );

    // CERT mode: A's certificate alone authenticates as A, with the binding's scopes.
    let (status, body) = put_certs(
        &without,
        &base,
        &a,
        json!({"authMode": "CERT",
               "certificates": [{"sha256": fp_a, "scopes": ["keys", "tokens:read"]}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, listed) = list_keys(&with_a, &base, None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        key_ids(&listed),
        ids_a,
        "the certificate acted as another merchant"
    );
    let r = with_a
        .get(format!("{base}/v1/audit-events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a scope the binding does not grant");
    // A malformed Authorization header is a failed key, not a fallback to the certificate.
    let r = with_a
        .get(format!("{base}/v1/api-keys"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Still never for B, and A's key alone is refused.
    assert_eq!(list_keys(&with_a, &base, Some(&key_b)).await.0, 403);
    assert_eq!(list_keys(&without, &base, Some(&key_a)).await.0, 403);
    assert_eq!(list_keys(&with_a, &base, Some(&key_a)).await.0, 200);
    // Certificates bound to nobody, or no certificate: no key, no entry.
    assert_eq!(list_keys(&with_u, &base, None).await.0, 401);
    assert_eq!(list_keys(&without, &base, None).await.0, 401);

    // A certificate binds to one merchant only.
    assert_eq!(
        code(
            &put_certs(
                &without,
                &base,
                &b,
                json!({"authMode": "API_KEY", "certificates": [{"sha256": fp_a}]}),
            )
            .await
        ),
        (409, Some("client_cert_in_use"))
    );
    // Once A lets it go, B can take it: from then on it acts for B, never for A.
    let (status, _) = put_certs(
        &without,
        &base,
        &a,
        json!({"authMode": "API_KEY", "certificates": []}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = put_certs(
        &without,
        &base,
        &b,
        json!({"authMode": "API_KEY", "certificates": [{"sha256": fp_a}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list_keys(&with_a, &base, Some(&key_a)).await.0, 403);
    assert_eq!(list_keys(&with_a, &base, Some(&key_b)).await.0, 200);
    assert_eq!(list_keys(&without, &base, Some(&key_a)).await.0, 200);

    // Reading back, and the admin API's refusals.
    let r = without
        .get(format!("{base}/v1/merchants/{b}/client-certs"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["certificates"][0]["sha256"], fp_a.as_str());
    assert_eq!(v["merchantId"], b.as_str());
    // The change is in B's audit trail, made by the admin.
    let r = without
        .get(format!("{base}/v1/audit-events"))
        .bearer_auth(&key_b)
        .send()
        .await
        .unwrap();
    let trail: Value = r.json().await.unwrap();
    let newest = &trail["data"][0];
    assert_eq!(newest["action"], "client_certs.update", "{trail}");
    assert_eq!(newest["actor"], "admin");
    let a_path = format!("/v1/merchants/{a}");
    refused_puts(
        &without,
        &base,
        [
            (
                a_path.as_str(),
                json!({"authMode": "CERT", "certificates": []}),
                (422, "client_cert_needed"),
            ),
            (
                &a_path,
                json!({"authMode": "API_KEY", "certificates": [{"sha256": "abc"}]}),
                (422, "invalid_client_cert_fingerprint"),
            ),
            (
                "/v1/merchants/mer_AAAAAAAAAAAAAAAA",
                json!({"authMode": "API_KEY", "certificates": []}),
                (404, "merchant_not_found"),
            ),
        ],
    )
    .await;
    let r = without
        .get(format!("{base}/v1/merchants/{a}/client-certs"))
        .bearer_auth(&key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a merchant key is not the admin token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_mutual_tls_with_unmapped_and_mapped_certificates() {
    let m = DevMaterial::generate(MGID).unwrap();
    let (_files, app) = start_mtls(&m, ClientCerts::Required).await;
    let base = https(app.addr, "");
    let (cert_a, key_pem_a) = m.issue_client_cert("psp-client-a").unwrap();
    let with_a = client(&m.ca_cert_pem, Some((&cert_a, &key_pem_a)), false);
    // The set's own client certificate, bound to nobody, is the admin's connection.
    let unmapped = client(&m.ca_cert_pem, gateway_identity(&m), true);
    let (a, key_a) = merchant(&unmapped, &base, "Merchant A").await;
    let (status, body) = put_certs(
        &unmapped,
        &base,
        &a,
        json!({"authMode": "CERT", "certificates": [{"sha256": fingerprint(&cert_a)}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // An unmapped certificate: no key -> 401; A's key -> 403 (A wants its own certificate).
    assert_eq!(
        code(&list_keys(&unmapped, &base, None).await),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        code(&list_keys(&unmapped, &base, Some(&key_a)).await),
        (403, Some("client_cert_required"))
    );
    // A's certificate: alone, and with A's key.
    assert_eq!(list_keys(&with_a, &base, None).await.0, 200);
    assert_eq!(list_keys(&with_a, &base, Some(&key_a)).await.0, 200);
    // One HTTP/2 connection, many requests: the certificate holds for each of them.
    let kept = keeping_client(&m.ca_cert_pem, Some((&cert_a, &key_pem_a)))
        .build()
        .unwrap();
    for _ in 0..3 {
        let (status, _) = list_keys(&kept, &base, None).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_unchanged_and_a_merchant_requiring_a_certificate_fails_closed() {
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__D1__ENABLED", "false")
        .start()
        .await;
    let c = &app.client;
    let (a, key_a) = merchant(c, &app.base, "Merchant A").await;
    let (_, key_b) = merchant(c, &app.base, "Merchant B").await;
    assert_eq!(list_keys(c, &app.base, Some(&key_a)).await.0, 200);
    assert_eq!(list_keys(c, &app.base, None).await.0, 401);
    // A requires a certificate, which plain HTTP cannot carry: A is refused, B is not.
    let m = DevMaterial::generate(MGID).unwrap();
    let (status, _) = put_certs(
        c,
        &app.base,
        &a,
        json!({"authMode": "API_KEY_AND_CERT",
               "certificates": [{"sha256": fingerprint(&m.gateway_client_cert_pem)}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        code(&list_keys(c, &app.base, Some(&key_a)).await),
        (403, Some("client_cert_required"))
    );
    assert_eq!(list_keys(c, &app.base, Some(&key_b)).await.0, 200);
}

// --- client certificates bound to issuers --------------------------------------------------------

async fn put_issuer_certs(c: &Client, base: &str, issuer: &str, body: Value) -> (u16, Value) {
    put_tenant_certs(c, base, &format!("/v1/issuers/{issuer}"), body).await
}

/// `GET /v1/issuer/operations` with an issuer key (or none): the status and the problem code.
async fn issuer_ops(c: &Client, base: &str, key: Option<&str>) -> (u16, Value) {
    get_as(c, base, "/v1/issuer/operations", key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_bound_to_client_certificates_need_them_and_never_act_for_another() {
    let m = DevMaterial::generate(MGID).unwrap();
    let (_files, app) = start_mtls(&m, ClientCerts::Optional).await;
    let base = https(app.addr, "");
    let (cert_i, key_pem_i) = m.issue_client_cert("bank-host").unwrap();
    let (cert_m, key_pem_m) = m.issue_client_cert("psp-host").unwrap();
    let (cert_u, key_pem_u) = m.issue_client_cert("unbound-host").unwrap();
    let with_i = client(&m.ca_cert_pem, Some((&cert_i, &key_pem_i)), false);
    let with_m = client(&m.ca_cert_pem, Some((&cert_m, &key_pem_m)), true);
    let with_u = client(&m.ca_cert_pem, Some((&cert_u, &key_pem_u)), false);
    let without = client(&m.ca_cert_pem, None, false);

    let Iss {
        id: iss,
        key: key_i,
        ..
    } = onboard(&without, &base, "BANKTLS001").await;
    let Iss {
        id: other,
        key: key_o,
        ..
    } = onboard(&without, &base, "BANKTLS002").await;
    let (mer, key_m) = merchant(&without, &base, "Merchant M").await;
    let (fp_i, fp_m, fp_u) = (
        fingerprint(&cert_i),
        fingerprint(&cert_m),
        fingerprint(&cert_u),
    );
    let (status, body) = put_certs(
        &without,
        &base,
        &mer,
        json!({"authMode": "API_KEY_AND_CERT", "certificates": [{"sha256": fp_m}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Nothing bound to the issuer yet: its key works with any certificate or none, except one
    // bound to another tenant.
    assert_eq!(issuer_ops(&without, &base, Some(&key_i)).await.0, 200);
    assert_eq!(issuer_ops(&with_u, &base, Some(&key_i)).await.0, 200);
    assert_eq!(
        code(&issuer_ops(&with_m, &base, Some(&key_i)).await),
        (403, Some("client_cert_mismatch")),
        "a merchant's certificate acted for an issuer"
    );

    // Bind a certificate to the issuer, key and certificate required (openssl form accepted).
    let (status, body) = put_issuer_certs(
        &without,
        &base,
        &iss,
        json!({"authMode": "API_KEY_AND_CERT",
               "certificates": [{"sha256": openssl_form(&fp_i), "name": "bank-host"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["issuerId"], iss.as_str());
    assert!(body.get("merchantId").is_none(), "{body}");
    assert_eq!(body["certificates"][0]["sha256"], fp_i.as_str());
    let scopes = body["certificates"][0]["scopes"].to_string();
    assert!(
        scopes.contains("issuer:operations") && !scopes.contains("tokens"),
        "an issuer binding has issuer scopes: {scopes}"
    );

    // Its key with its certificate: served (HTTP/2). Without one, or with an unbound one: the
    // merchants' refusal.
    assert_eq!(issuer_ops(&with_i, &base, Some(&key_i)).await.0, 200);
    for (c, what) in [
        (&without, "no certificate"),
        (&with_u, "an unbound certificate"),
    ] {
        let r = issuer_ops(c, &base, Some(&key_i)).await;
        assert_eq!(code(&r), (403, Some("client_cert_required")), "{what}");
        assert!(
            !r.1.to_string().contains(&iss),
            "the refusal names the issuer"
        );
    }
    // Its certificate never acts for another tenant: another issuer's key, a merchant's key.
    assert_eq!(
        code(&issuer_ops(&with_i, &base, Some(&key_o)).await),
        (403, Some("client_cert_mismatch"))
    );
    assert_eq!(
        code(&list_keys(&with_i, &base, Some(&key_m)).await),
        (403, Some("client_cert_mismatch"))
    );
    // Nor alone: an issuer's certificate authenticates nothing without a key.
    assert_eq!(issuer_ops(&with_i, &base, None).await.0, 401);
    assert_eq!(list_keys(&with_i, &base, None).await.0, 401);
    // The other issuer (no binding) is unaffected.
    assert_eq!(issuer_ops(&without, &base, Some(&key_o)).await.0, 200);

    // The rules of the admin route: no CERT mode for issuers, one tenant per certificate,
    // issuer scopes only, unknown issuers.
    let (iss_path, other_path) = (format!("/v1/issuers/{iss}"), format!("/v1/issuers/{other}"));
    refused_puts(
        &without,
        &base,
        [
            (
                iss_path.as_str(),
                json!({"authMode": "CERT", "certificates": [{"sha256": fp_i}]}),
                (422, "invalid_auth_mode"),
            ),
            (
                &other_path,
                json!({"authMode": "API_KEY", "certificates": [{"sha256": fp_m}]}),
                (409, "client_cert_in_use"),
            ),
            (
                &format!("/v1/merchants/{mer}"),
                json!({"authMode": "API_KEY", "certificates": [{"sha256": fp_i}]}),
                (409, "client_cert_in_use"),
            ),
            (
                &other_path,
                json!({"authMode": "API_KEY", "certificates": [{"sha256": fp_u, "scopes": ["tokens:read"]}]}),
                (422, "invalid_scopes"),
            ),
            (
                "/v1/issuers/iss_AAAAAAAAAAAAAAAA",
                json!({"authMode": "API_KEY", "certificates": []}),
                (404, "issuer_not_found"),
            ),
        ],
    )
    .await;
    let r = without
        .get(format!("{base}/v1/issuers/{iss}/client-certs"))
        .bearer_auth(&key_i)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an issuer key is not the admin token");
    let r = without
        .get(format!("{base}/v1/merchants/{iss}/client-certs"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "an issuer is not a merchant");

    // Unbinding frees the certificate and the key works alone again.
    let (status, _) = put_issuer_certs(
        &without,
        &base,
        &iss,
        json!({"authMode": "API_KEY", "certificates": []}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(issuer_ops(&without, &base, Some(&key_i)).await.0, 200);
    let r = without
        .get(format!("{base}/v1/issuers/{iss}/client-certs"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["authMode"], "API_KEY");
    assert_eq!(v["certificates"], json!([]));

    // Every change (and the refused CERT one) is in the issuer's trail, by the admin.
    let r = without
        .get(format!("{base}/v1/issuer/audit-events"))
        .bearer_auth(&key_i)
        .send()
        .await
        .unwrap();
    let trail: Value = r.json().await.unwrap();
    let changes: Vec<&str> = trail["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "client_certs.update")
        .map(|e| {
            assert_eq!(e["actor"], "admin");
            e["outcome"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        changes,
        ["success", "invalid_auth_mode", "success"],
        "{trail}"
    );
}
