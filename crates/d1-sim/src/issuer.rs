//! The issuer side of the simulated D1 (`/banking/v1/issuers/{issuerId}/...`): Click to Pay
//! enrolment, update, opt-out and profiles, and get-operation, as docs/d1-protocol.md ("Issuer
//! side") describes them.
//!
//! - **Card registry**: D1 knows the issuer's cards; tests and demos seed them with the control
//!   API (`PUT /sim/issuers/{issuerId}/cards/{cardId}`: PAN, expiry, consumer details). The PAN
//!   lives only here; it leaves only inside a profile answer (which the gateway masks).
//! - **Operations**: a call is validated (D1's patterns, 400 `FIELD_INVALID_FORMAT`), answered
//!   202 `{operationId, status: PENDING}`, and completed after `completionDelayMs`
//!   (`PUT /sim/issuer-settings`), followed by a batched notification
//!   (`POST /notifications/d1/v2/issuers/{issuerId}/cards`, or `/consumers` for consumer
//!   operations) with the notifier's redelivery, duplicate and reorder behaviour.
//! - **Dedup**: a call repeating an `issuerRequestId` answers the operation it created, and
//!   creates nothing (`issuerOperationsCreated` in `/sim/stats` counts real creations).
//! - **Click to Pay rules** (D1-NOTES A2): the first enrolment of a consumer's card creates the
//!   consumer profile, later ones add cards; a card seeded with `failEnrolment` fails while its
//!   consumer stays enrolled; a consumer opt-out removes the profile and every card; opting out
//!   the last card removes the cardholder details; re-enrolment is allowed.
//! - **Card deletion** (D1-NOTES A2: "deleting a card in D1 also opts it out of Click to Pay"):
//!   through `operations:delete` (our inference) or the control API
//!   (`POST /sim/issuers/{issuerId}/cards/{cardId}/delete`, as if the bank used another D1
//!   channel). It completes like any operation (`operation: DELETE` notification); the card
//!   leaves Click to Pay (the last card of a consumer removes the cardholder details) and every
//!   later enrolment, update, opt-out or order of it is refused (400 `CARD_DELETED`).
//! - **Errors**: 400 `{errorCode, errorMessage}`; 401 `AUTHORIZER_UNAUTHORIZED` (the shared
//!   bearer check); an injected 500 answers `{"error": "..."}` (the issuer API's 500 shape).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::api::{ApiError, add_noise, check_request, reset_response};
use super::context::{Shared, Stats};
use super::faults::{Injected, Op, TIMEOUT_HOLD};
use super::notify::format_timestamp;
use super::state::{lock, random_id};
use tokengate_d1_protocol::issuer::{
    CardDeleteRequest, ClickToPayEnrolmentRequest, ClickToPayOptOutRequest,
    ClickToPayUpdateRequest, OperationObject,
};

/// Path prefix of the issuer API, as in D1's "banking" base URL.
pub const BASE_PATH: &str = "/banking/v1";
/// The Click to Pay directory profiles are reported for (one profile per directory).
const DIRECTORY: &str = "VISA_SRC";

/// Settings of the issuer side (`/sim/issuer-settings`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct IssuerSettings {
    /// How long an operation stays `PENDING` before it completes.
    pub completion_delay_ms: u64,
    /// No notification is sent when an operation completes (only get-operation tells).
    pub suppress_notifications: bool,
    /// The next this many calls that create an operation create it, then answer 500 as if the
    /// answer was lost on the way: the caller cannot know, and must re-drive.
    pub lose_answers: u32,
}

impl Default for IssuerSettings {
    fn default() -> Self {
        IssuerSettings {
            completion_delay_ms: 50,
            suppress_notifications: false,
            lose_answers: 0,
        }
    }
}

/// A card D1 knows for an issuer.
struct SimCard {
    pan: Zeroizing<String>,
    expiry: String,
    consumer_id: String,
    fail_enrolment: bool,
    billing_address: Option<Value>,
    /// Click to Pay: enrolled, with this cardholder name.
    enrolled: Option<String>,
    /// Deleted at D1 (by the API or the control API): refuses everything after.
    deleted: bool,
}

/// A Click to Pay consumer (the profile exists while `enrolled`).
#[derive(Default, Clone)]
struct Consumer {
    first_name: Option<String>,
    last_name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    language: Option<String>,
    enrolled: bool,
}

#[derive(Default)]
struct Data {
    cards: HashMap<(String, String), SimCard>,
    consumers: HashMap<(String, String), Consumer>,
    operations: HashMap<String, (String, OperationObject)>,
    by_request: HashMap<(String, String), String>,
}

/// The issuer side's state.
#[derive(Default)]
pub struct IssuerState {
    data: Mutex<Data>,
    settings: Mutex<IssuerSettings>,
}

impl IssuerState {
    /// Whether D1 deleted this card (orders refuse it too).
    pub fn is_deleted(&self, issuer: &str, card: &str) -> bool {
        lock(&self.data)
            .cards
            .get(&(issuer.to_owned(), card.to_owned()))
            .is_some_and(|c| c.deleted)
    }
}

fn field_invalid(msg: &str) -> Response {
    issuer_error(StatusCode::BAD_REQUEST, "FIELD_INVALID_FORMAT", msg)
}

/// A refusal on the way through a handler (boxed: a `Response` is large).
type Reject = Box<Response>;

fn reject(msg: &str) -> Reject {
    Box::new(field_invalid(msg))
}

fn issuer_error(status: StatusCode, code: &str, msg: &str) -> Response {
    (
        status,
        axum::Json(json!({"errorCode": code, "errorMessage": msg, "retryable": false})),
    )
        .into_response()
}

fn valid(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_issuer(id: &str) -> Result<(), Reject> {
    if id.len() == 10 && valid(id, 10) {
        Ok(())
    } else {
        Err(reject("issuerId must be exactly 10 characters"))
    }
}

fn check_reason(reason: Option<&str>, code: Option<&str>) -> Result<(), Reject> {
    if let Some(r) = reason
        && !((1..=64).contains(&r.len())
            && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' '))
    {
        return Err(reject("reason must match ^[a-zA-Z0-9 ]{1,64}$"));
    }
    if let Some(c) = code
        && !((1..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
    {
        return Err(reject("reasonCode is not a known code"));
    }
    Ok(())
}

fn now() -> String {
    format_timestamp(OffsetDateTime::now_utc())
}

/// The issuer routes, each behind [`issuer_gate`].
pub fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let g = |op: Op| from_fn_with_state((shared.clone(), op), issuer_gate);
    let card = format!("{BASE_PATH}/issuers/{{issuer_id}}/cards/{{card_id}}");
    let consumer = format!("{BASE_PATH}/issuers/{{issuer_id}}/consumers/{{consumer_id}}");
    Router::new()
        .route(
            &format!("{card}/operations:clickToPayEnrolment"),
            post(card_enrol).route_layer(g(Op::ClickToPayEnrolment)),
        )
        .route(
            &format!("{card}/operations:clickToPayUpdate"),
            post(card_update).route_layer(g(Op::ClickToPayUpdate)),
        )
        .route(
            &format!("{consumer}/operations:clickToPayUpdate"),
            post(consumer_update).route_layer(g(Op::ClickToPayUpdate)),
        )
        .route(
            &format!("{card}/operations:clickToPayOptOut"),
            post(card_opt_out).route_layer(g(Op::ClickToPayOptOut)),
        )
        .route(
            &format!("{consumer}/operations:clickToPayOptOut"),
            post(consumer_opt_out).route_layer(g(Op::ClickToPayOptOut)),
        )
        .route(
            &format!("{card}/operations:delete"),
            post(card_delete).route_layer(g(Op::CardDelete)),
        )
        .route(
            &format!("{card}/clickToPayProfiles"),
            get(card_profiles).route_layer(g(Op::ClickToPayProfiles)),
        )
        .route(
            &format!("{consumer}/clickToPayProfiles"),
            get(consumer_profiles).route_layer(g(Op::ClickToPayProfiles)),
        )
        .route(
            &format!("{BASE_PATH}/issuers/{{issuer_id}}/operations/{{operation_id}}"),
            get(get_operation).route_layer(g(Op::GetOperation)),
        )
}

/// The shared gate (counting, latency, faults, correlation id, bearer token, noise), with the
/// issuer API's 500 shape `{"error": ...}`.
async fn issuer_gate(
    State((shared, op)): State<(Arc<Shared>, Op)>,
    req: Request,
    next: Next,
) -> Response {
    shared.stats.count_request(op);
    let faults = shared.faults();
    let delay = faults.latency_for(op);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let retry_after = faults.retry_after_seconds;
    let resp = match faults.roll(op) {
        Injected::Reset => return reset_response(),
        Injected::Timeout => {
            tokio::time::sleep(TIMEOUT_HOLD).await;
            return reset_response();
        }
        Injected::Status(429) => ApiError::TooManyRequests { retry_after }.into_response(),
        Injected::Status(503) => ApiError::Unavailable { retry_after }.into_response(),
        Injected::Status(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "internal error"})),
        )
            .into_response(),
        Injected::Serve => match check_request(&shared, op, req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        },
    };
    if faults.noise_for(op) {
        add_noise(resp).await
    } else {
        resp
    }
}

/// What a completed operation does to the registry.
#[derive(Debug, Clone)]
enum Effect {
    Enrol {
        cardholder_name: String,
    },
    UpdateCard {
        cardholder_name: Option<String>,
    },
    UpdateConsumer,
    OptOutCard,
    OptOutConsumer,
    /// Deletes the card (and so opts it out of Click to Pay).
    DeleteCard,
}

enum Target {
    Card(String),
    Consumer(String),
}

/// Creates the operation (or answers the one this `issuerRequestId` already created) and
/// schedules its completion.
fn start(
    shared: &Arc<Shared>,
    issuer: &str,
    target: Target,
    kind: &str,
    request_id: Option<String>,
    effect: Effect,
) -> Response {
    let mut data = lock(&shared.issuer.data);
    if let Some(r) = &request_id
        && let Some(existing) = data.by_request.get(&(issuer.to_owned(), r.clone()))
        && let Some((_, op)) = data.operations.get(existing)
    {
        return (
            StatusCode::ACCEPTED,
            axum::Json(json!({"operationId": op.operation_id, "status": op.status})),
        )
            .into_response();
    }
    let (card_id, consumer_id) = match &target {
        Target::Card(c) => {
            let Some(card) = data.cards.get(&(issuer.to_owned(), c.clone())) else {
                return issuer_error(StatusCode::NOT_FOUND, "CARD_NOT_FOUND", "unknown card");
            };
            if card.deleted {
                return issuer_error(
                    StatusCode::BAD_REQUEST,
                    "CARD_DELETED",
                    "the card is deleted",
                );
            }
            (Some(c.clone()), Some(card.consumer_id.clone()))
        }
        Target::Consumer(c) => {
            if !data.consumers.contains_key(&(issuer.to_owned(), c.clone())) {
                return issuer_error(
                    StatusCode::NOT_FOUND,
                    "CONSUMER_NOT_FOUND",
                    "unknown consumer",
                );
            }
            (None, Some(c.clone()))
        }
    };
    let op_id = uuid::Uuid::new_v4().to_string();
    let op = OperationObject {
        operation_id: op_id.clone(),
        operation: kind.to_owned(),
        status: "PENDING".into(),
        start_time: Some(now()),
        end_time: None,
        card_id,
        consumer_id: match target {
            Target::Consumer(_) => consumer_id,
            Target::Card(_) => None,
        },
        details: None,
        error_code: None,
        error: None,
        issuer_request_id: request_id.clone(),
    };
    if let Some(r) = request_id {
        data.by_request
            .insert((issuer.to_owned(), r), op_id.clone());
    }
    data.operations
        .insert(op_id.clone(), (issuer.to_owned(), op));
    drop(data);
    Stats::bump(&shared.stats.issuer_operations_created);
    let delay = Duration::from_millis(lock(&shared.issuer.settings).completion_delay_ms);
    let shared2 = shared.clone();
    let issuer2 = issuer.to_owned();
    let id2 = op_id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        complete(&shared2, &issuer2, &id2, effect);
    });
    {
        let mut s = lock(&shared.issuer.settings);
        if s.lose_answers > 0 {
            s.lose_answers -= 1;
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": "internal error"})),
            )
                .into_response();
        }
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"operationId": op_id, "status": "PENDING"})),
    )
        .into_response()
}

/// Applies `effect`, finishes the operation and sends its notification.
fn complete(shared: &Shared, issuer: &str, op_id: &str, effect: Effect) {
    let mut data = lock(&shared.issuer.data);
    let Some((_, op)) = data.operations.get(op_id).cloned() else {
        return;
    };
    let key = |s: &str| (issuer.to_owned(), s.to_owned());
    let mut failure: Option<(&str, &str)> = None;
    let mut consumer_path = false;
    match effect {
        Effect::Enrol { cardholder_name } => {
            let card_id = op.card_id.clone().unwrap_or_default();
            let (consumer_id, fail) = match data.cards.get(&key(&card_id)) {
                Some(c) => (c.consumer_id.clone(), c.fail_enrolment),
                None => (String::new(), true),
            };
            // The consumer profile is created (or kept) whatever happens to the card.
            if let Some(c) = data.consumers.get_mut(&key(&consumer_id)) {
                c.enrolled = true;
            }
            if fail {
                failure = Some(("CARD_NOT_ELIGIBLE", "the card could not be enrolled"));
            } else if let Some(c) = data.cards.get_mut(&key(&card_id)) {
                c.enrolled = Some(cardholder_name);
            }
        }
        Effect::UpdateCard { cardholder_name } => {
            let card_id = op.card_id.clone().unwrap_or_default();
            match data.cards.get_mut(&key(&card_id)) {
                Some(c) if c.enrolled.is_some() => {
                    if let Some(n) = cardholder_name {
                        c.enrolled = Some(n);
                    }
                }
                _ => failure = Some(("CARD_NOT_ENROLLED", "the card is not enrolled")),
            }
        }
        Effect::UpdateConsumer => {
            consumer_path = true;
            let enrolled = op
                .consumer_id
                .as_deref()
                .and_then(|c| data.consumers.get(&key(c)))
                .is_some_and(|c| c.enrolled);
            if !enrolled {
                failure = Some(("CONSUMER_NOT_ENROLLED", "the consumer is not enrolled"));
            }
        }
        Effect::OptOutCard => {
            let card_id = op.card_id.clone().unwrap_or_default();
            let consumer_id = data
                .cards
                .get(&key(&card_id))
                .map(|c| c.consumer_id.clone());
            match data.cards.get_mut(&key(&card_id)) {
                Some(c) if c.enrolled.is_some() => c.enrolled = None,
                _ => failure = Some(("CARD_NOT_ENROLLED", "the card is not enrolled")),
            }
            // The last card opted out: D1 removes the cardholder details (the profile).
            if let Some(cid) = consumer_id {
                let any_left = data
                    .cards
                    .iter()
                    .any(|((i, _), c)| i == issuer && c.consumer_id == cid && c.enrolled.is_some());
                if !any_left && let Some(c) = data.consumers.get_mut(&key(&cid)) {
                    c.enrolled = false;
                }
            }
        }
        Effect::DeleteCard => {
            let card_id = op.card_id.clone().unwrap_or_default();
            match data.cards.get_mut(&key(&card_id)) {
                Some(c) if !c.deleted => {
                    c.deleted = true;
                    c.enrolled = None;
                    let cid = c.consumer_id.clone();
                    remove_details_if_last(&mut data, issuer, &cid);
                }
                _ => failure = Some(("CARD_DELETED", "the card is already deleted")),
            }
        }
        Effect::OptOutConsumer => {
            consumer_path = true;
            let cid = op.consumer_id.clone().unwrap_or_default();
            match data.consumers.get_mut(&key(&cid)) {
                Some(c) if c.enrolled => c.enrolled = false,
                _ => failure = Some(("CONSUMER_NOT_ENROLLED", "the consumer is not enrolled")),
            }
            for ((i, _), c) in data.cards.iter_mut() {
                if i == issuer && c.consumer_id == cid {
                    c.enrolled = None;
                }
            }
        }
    }
    let Some((_, stored)) = data.operations.get_mut(op_id) else {
        return;
    };
    stored.end_time = Some(now());
    match failure {
        Some((code, msg)) => {
            stored.status = "FAILED".into();
            stored.error_code = Some(code.into());
            stored.error = Some(msg.into());
        }
        None => stored.status = "SUCCESSFUL".into(),
    }
    let item = stored.clone();
    drop(data);
    tracing::info!(operation_id = op_id, status = %item.status, "issuer operation completed");
    if lock(&shared.issuer.settings).suppress_notifications {
        return;
    }
    let path = format!(
        "/notifications/d1/v2/issuers/{issuer}/{}",
        if consumer_path { "consumers" } else { "cards" }
    );
    shared
        .notifier
        .emit_to(path, op_id, &json!({ "operations": [item] }));
}

/// The last Click to Pay card of a consumer left: D1 removes the cardholder details.
fn remove_details_if_last(data: &mut Data, issuer: &str, consumer_id: &str) {
    let any_left = data
        .cards
        .iter()
        .any(|((i, _), c)| i == issuer && c.consumer_id == consumer_id && c.enrolled.is_some());
    if !any_left
        && let Some(c) = data
            .consumers
            .get_mut(&(issuer.to_owned(), consumer_id.to_owned()))
    {
        c.enrolled = false;
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Reject> {
    serde_json::from_slice(body).map_err(|_| reject("the body is not the expected JSON"))
}

fn request_id(r: Option<&String>) -> Result<Option<String>, Reject> {
    match r {
        Some(r) if !valid(r, 64) => Err(reject("issuerRequestId must match ^[A-Za-z0-9_-]{1,64}$")),
        other => Ok(other.cloned()),
    }
}

/// The card an operation's path names, after D1's path checks (issuer id, then `cardId`).
fn card_target(issuer: &str, card: &str) -> Result<Target, Reject> {
    check_issuer(issuer)?;
    if !valid(card, 48) {
        return Err(reject("cardId must match ^[A-Za-z0-9_-]{1,48}$"));
    }
    Ok(Target::Card(card.to_owned()))
}

/// The consumer an operation's path names, after D1's path checks (issuer id, then
/// `consumerId`).
fn consumer_target(issuer: &str, consumer: &str) -> Result<Target, Reject> {
    check_issuer(issuer)?;
    if !valid(consumer, 64) {
        return Err(reject("consumerId must match ^[A-Za-z0-9_-]{1,64}$"));
    }
    Ok(Target::Consumer(consumer.to_owned()))
}

/// The body checks every issuer operation shares (`reason`, `reasonCode`, `issuerRequestId`),
/// then [`start`].
fn start_checked(
    shared: &Arc<Shared>,
    issuer: &str,
    target: Target,
    kind: &str,
    (reason, reason_code, request): (&Option<String>, &Option<String>, &Option<String>),
    effect: Effect,
) -> Result<Response, Reject> {
    check_reason(reason.as_deref(), reason_code.as_deref())?;
    let rid = request_id(request.as_ref())?;
    Ok(start(shared, issuer, target, kind, rid, effect))
}

async fn card_enrol(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Reject> {
        let target = card_target(&issuer, &card)?;
        let req: ClickToPayEnrolmentRequest = parse(&body)?;
        let n = req.cardholder_name.chars().count();
        if n == 0 || n > 26 {
            return Err(reject("cardholderName must be 1 to 26 characters"));
        }
        start_checked(
            &shared,
            &issuer,
            target,
            "CLICK_TO_PAY_ENROLMENT",
            (&req.reason, &req.reason_code, &req.issuer_request_id),
            Effect::Enrol {
                cardholder_name: req.cardholder_name,
            },
        )
    };
    run().unwrap_or_else(|e| *e)
}

async fn card_update(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Reject> {
        let target = card_target(&issuer, &card)?;
        let req: ClickToPayUpdateRequest = parse(&body)?;
        if let Some(n) = &req.cardholder_name
            && !(1..=26).contains(&n.chars().count())
        {
            return Err(reject("cardholderName must be 1 to 26 characters"));
        }
        start_checked(
            &shared,
            &issuer,
            target,
            "CLICK_TO_PAY_UPDATE",
            (&req.reason, &req.reason_code, &req.issuer_request_id),
            Effect::UpdateCard {
                cardholder_name: req.cardholder_name,
            },
        )
    };
    run().unwrap_or_else(|e| *e)
}

async fn consumer_update(
    State(shared): State<Arc<Shared>>,
    Path((issuer, consumer)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Reject> {
        let target = consumer_target(&issuer, &consumer)?;
        let req: ClickToPayUpdateRequest = parse(&body)?;
        start_checked(
            &shared,
            &issuer,
            target,
            "CLICK_TO_PAY_UPDATE",
            (&req.reason, &req.reason_code, &req.issuer_request_id),
            Effect::UpdateConsumer,
        )
    };
    run().unwrap_or_else(|e| *e)
}

async fn card_opt_out(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Reject> {
        let target = card_target(&issuer, &card)?;
        let req: ClickToPayOptOutRequest = parse(&body)?;
        start_checked(
            &shared,
            &issuer,
            target,
            "CLICK_TO_PAY_OPT_OUT",
            (&req.reason, &req.reason_code, &req.issuer_request_id),
            Effect::OptOutCard,
        )
    };
    run().unwrap_or_else(|e| *e)
}

async fn card_delete(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Reject> {
        let target = card_target(&issuer, &card)?;
        let req: CardDeleteRequest = if body.is_empty() {
            CardDeleteRequest::default()
        } else {
            parse(&body)?
        };
        start_checked(
            &shared,
            &issuer,
            target,
            "DELETE",
            (&req.reason, &req.reason_code, &req.issuer_request_id),
            Effect::DeleteCard,
        )
    };
    run().unwrap_or_else(|e| *e)
}

async fn consumer_opt_out(
    State(shared): State<Arc<Shared>>,
    Path((issuer, consumer)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Reject> {
        let target = consumer_target(&issuer, &consumer)?;
        let req: ClickToPayOptOutRequest = parse(&body)?;
        start_checked(
            &shared,
            &issuer,
            target,
            "CLICK_TO_PAY_OPT_OUT",
            (&req.reason, &req.reason_code, &req.issuer_request_id),
            Effect::OptOutConsumer,
        )
    };
    run().unwrap_or_else(|e| *e)
}

/// The profile of `consumer_id` (one directory), listing its enrolled cards; `None` when the
/// consumer is not enrolled.
fn profile(data: &Data, issuer: &str, consumer_id: &str) -> Option<Value> {
    let c = data
        .consumers
        .get(&(issuer.to_owned(), consumer_id.to_owned()))?;
    if !c.enrolled {
        return None;
    }
    let cards: Vec<Value> = data
        .cards
        .iter()
        .filter(|((i, _), k)| i == issuer && k.consumer_id == consumer_id && k.enrolled.is_some())
        .map(|((_, id), k)| {
            json!({
                "cardId": id,
                "pan": k.pan.as_str(),
                "expiry": k.expiry,
                "cardholderName": k.enrolled,
                "billingAddress": k.billing_address,
            })
        })
        .collect();
    Some(json!({
        "directory": DIRECTORY,
        "consumerId": consumer_id,
        "name": {"firstName": c.first_name, "lastName": c.last_name},
        "email": c.email,
        "phone": c.phone,
        "language": c.language,
        "cards": cards,
    }))
}

async fn card_profiles(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
) -> Response {
    if let Err(e) = check_issuer(&issuer) {
        return *e;
    }
    let data = lock(&shared.issuer.data);
    let Some(k) = data.cards.get(&(issuer.clone(), card.clone())) else {
        return issuer_error(StatusCode::NOT_FOUND, "CARD_NOT_FOUND", "unknown card");
    };
    let profiles: Vec<Value> = if k.enrolled.is_some() {
        profile(&data, &issuer, &k.consumer_id)
            .into_iter()
            .collect()
    } else {
        Vec::new()
    };
    axum::Json(json!({ "clickToPayProfiles": profiles })).into_response()
}

async fn consumer_profiles(
    State(shared): State<Arc<Shared>>,
    Path((issuer, consumer)): Path<(String, String)>,
) -> Response {
    if let Err(e) = check_issuer(&issuer) {
        return *e;
    }
    let data = lock(&shared.issuer.data);
    if !data
        .consumers
        .contains_key(&(issuer.clone(), consumer.clone()))
    {
        return issuer_error(
            StatusCode::NOT_FOUND,
            "CONSUMER_NOT_FOUND",
            "unknown consumer",
        );
    }
    let profiles: Vec<Value> = profile(&data, &issuer, &consumer).into_iter().collect();
    axum::Json(json!({ "clickToPayProfiles": profiles })).into_response()
}

async fn get_operation(
    State(shared): State<Arc<Shared>>,
    Path((issuer, op_id)): Path<(String, String)>,
) -> Response {
    if let Err(e) = check_issuer(&issuer) {
        return *e;
    }
    let data = lock(&shared.issuer.data);
    match data.operations.get(&op_id) {
        Some((i, op)) if *i == issuer => axum::Json(op.clone()).into_response(),
        // Production orders are operations too (`orders.rs`).
        _ if let Some(order) = shared.orders.by_operation(&issuer, &op_id) => {
            axum::Json(order.notification()).into_response()
        }
        _ => issuer_error(
            StatusCode::NOT_FOUND,
            "OPERATION_NOT_FOUND",
            "unknown operation",
        ),
    }
}

// --- control API -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedCard {
    pan: String,
    /// `MMYY`.
    expiry: String,
    /// Cards seeded with the same consumer id belong to one consumer.
    #[serde(default)]
    consumer_id: Option<String>,
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    billing_address: Option<Value>,
    /// Enrolment of this card fails (its consumer is enrolled all the same).
    #[serde(default)]
    fail_enrolment: bool,
}

/// `PUT /sim/issuers/{issuerId}/cards/{cardId}`: D1 now knows this card. Answers the consumer
/// id (never the PAN).
pub async fn seed_card(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if check_issuer(&issuer).is_err() || !valid(&card, 48) {
        return ApiError::InvalidField("issuerId (10 characters) or cardId malformed".into())
            .into_response();
    }
    let mut req: SeedCard = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return ApiError::InvalidField(
                "body must be {pan, expiry, consumerId?, firstName?, lastName?, email?, phone?, language?, billingAddress?, failEnrolment?}".into(),
            )
            .into_response();
        }
    };
    if !(12..=19).contains(&req.pan.len()) || !req.pan.bytes().all(|b| b.is_ascii_digit()) {
        return ApiError::InvalidField("pan must be 12 to 19 digits".into()).into_response();
    }
    let consumer_id = req
        .consumer_id
        .clone()
        .filter(|c| valid(c, 64))
        .unwrap_or_else(|| random_id("cons_", 12));
    let mut data = lock(&shared.issuer.data);
    let entry = data
        .consumers
        .entry((issuer.clone(), consumer_id.clone()))
        .or_default();
    for (slot, v) in [
        (&mut entry.first_name, &req.first_name),
        (&mut entry.last_name, &req.last_name),
        (&mut entry.email, &req.email),
        (&mut entry.phone, &req.phone),
        (&mut entry.language, &req.language),
    ] {
        if v.is_some() {
            slot.clone_from(v);
        }
    }
    data.cards.insert(
        (issuer, card.clone()),
        SimCard {
            pan: Zeroizing::new(std::mem::take(&mut req.pan)),
            expiry: req.expiry,
            consumer_id: consumer_id.clone(),
            fail_enrolment: req.fail_enrolment,
            billing_address: req.billing_address,
            enrolled: None,
            deleted: false,
        },
    );
    (
        StatusCode::OK,
        axum::Json(json!({"cardId": card, "consumerId": consumer_id})),
    )
        .into_response()
}

/// `POST /sim/issuers/{issuerId}/cards/{cardId}/delete`: the bank deletes the card through
/// another D1 channel. D1 runs a `DELETE` operation of its own (no `issuerRequestId`), which
/// completes and is notified like any other. Answers `202 {operationId, status}`; 404 for an
/// unknown card, 400 `CARD_DELETED` when it is deleted already.
pub async fn control_delete_card(
    State(shared): State<Arc<Shared>>,
    Path((issuer, card)): Path<(String, String)>,
) -> Response {
    if check_issuer(&issuer).is_err() || !valid(&card, 48) {
        return ApiError::InvalidField("issuerId (10 characters) or cardId malformed".into())
            .into_response();
    }
    start(
        &shared,
        &issuer,
        Target::Card(card),
        "DELETE",
        None,
        Effect::DeleteCard,
    )
}

pub async fn get_settings(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(lock(&shared.issuer.settings).clone()).into_response()
}

pub async fn put_settings(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<IssuerSettings>(&body) {
        Ok(s) if s.completion_delay_ms <= 60_000 => {
            *lock(&shared.issuer.settings) = s.clone();
            axum::Json(s).into_response()
        }
        _ => ApiError::InvalidField(
            "body must be {completionDelayMs (<= 60000), suppressNotifications, loseAnswers}"
                .into(),
        )
        .into_response(),
    }
}
