//! `tokengate import` against a real sandbox gateway: mapping and errors files, dedup, bad
//! lines, CSV and JSON lines, rate limiting, a stop and a resume without a second token, and no
//! card number in anything the importer writes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{Value, json};
use tokengate::import::progress::ProgressMode;
use tokengate::import::{Options, Stop, Summary};
use tokio::sync::mpsc;

use crate::support::app::{Backend, TestApp};

/// A 16-digit Visa-range card number from `n`, with its Luhn check digit.
fn pan(n: u64) -> String {
    let payload = format!("4{:014}", n);
    let mut sum = 0;
    for (i, c) in payload.chars().rev().enumerate() {
        let mut d = c.to_digit(10).unwrap();
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    format!("{payload}{}", (10 - sum % 10) % 10)
}

fn jsonl(reference: &str, number: &str, month: u32, year: u32) -> String {
    format!(
        "{{\"ref\":\"{reference}\",\"number\":\"{number}\",\"expiryMonth\":{month},\"expiryYear\":{year},\"customerReference\":\"cust-{reference}\"}}\n"
    )
}

fn options(app: &TestApp, key: &str, file: &Path, out: &Path) -> Options {
    let mut o = Options::new(app.base.clone(), SecretString::from(key.to_owned()), file);
    o.out_dir = Some(out.to_path_buf());
    o.progress = ProgressMode::Off;
    o.concurrency = 4;
    o
}

/// Runs to the end, without stop requests.
async fn import(opts: Options) -> Summary {
    let (_tx, rx) = mpsc::unbounded_channel();
    tokengate::import::run(opts, rx).await.expect("import runs")
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect()
}

/// line -> record.
fn by_line(records: &[Value]) -> HashMap<u64, Value> {
    records
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r.clone()))
        .collect()
}

/// No card number of the input, in any form, in any file of `dir` nor in `extra`.
fn assert_no_pan(dir: &Path, pans: &[String], extra: &str) {
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "cards.jsonl" || name == "cards.csv" || path.is_dir() {
            continue; // the input itself
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        for p in pans {
            assert!(!text.contains(p.as_str()), "a PAN in {}", path.display());
            // And no run of its digits longer than what the API answers (BIN, last four).
            assert!(!text.contains(&p[..10]), "PAN digits in {}", path.display());
        }
    }
    assert!(files >= 3, "mapping, errors and state files written");
    for p in pans {
        assert!(!extra.contains(p.as_str()), "a PAN in the summary");
    }
}

async fn token_of(app: &TestApp, key: &str, pan: &str) -> (u16, String) {
    let r = app.tokenize(key, pan).await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    (status, v["id"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_jsonl_maps_cards_dedups_and_records_bad_lines() {
    let app = TestApp::start(Backend::Embedded).await;
    let (_, key) = app.create_merchant("Migrating PSP").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cards.jsonl");
    let out = dir.path().join("out");
    let pans: Vec<String> = (1..=5).map(pan).collect();
    let bad_luhn = {
        let mut p = pan(9);
        let last = p.pop().unwrap().to_digit(10).unwrap();
        p.push(char::from_digit((last + 1) % 10, 10).unwrap());
        p
    };
    let mut content = String::new();
    for (i, p) in pans.iter().enumerate() {
        content.push_str(&jsonl(&format!("psp-{}", i + 1), p, 12, 2030)); // lines 1-5
    }
    content.push_str(&jsonl("dup-1", &pans[0], 11, 2031)); // 6: same card, new expiry
    content.push_str(&jsonl("dup-3", &pans[2], 12, 2030)); // 7
    content.push_str(&jsonl("bad-luhn", &bad_luhn, 12, 2030)); // 8
    content.push_str(&jsonl("expired", &pan(10), 1, 2020)); // 9
    content.push_str(&format!(
        "{{\"ref\":\"broken\",\"number\":\"{}\"\n",
        pan(11)
    )); // 10
    content.push_str(&format!(
        "{{\"ref\":\"typed\",\"number\":\"{}\",\"expiryMonth\":\"{}\",\"expiryYear\":2030}}\n",
        pan(12),
        pan(12)
    )); // 11: wrong type, the value a card number
    content.push_str("{\"ref\":\"nonumber\",\"expiryMonth\":1,\"expiryYear\":2030}\n"); // 12
    content.push('\n'); // 13: blank
    content.push_str(&format!(
        "{{\"number\":\"{}\",\"expiryMonth\":3,\"expiryYear\":2032}}",
        pan(13)
    )); // 14: no ref, no final line break
    std::fs::write(&file, &content).unwrap();

    let summary = import(options(&app, &key, &file, &out)).await;
    assert!(summary.complete, "{summary}");
    assert_eq!(summary.stopped, None);
    let c = summary.counts;
    assert_eq!(
        (c.read, c.created, c.existing, c.errors, c.retryable),
        (14, 6, 2, 5, 0),
        "{summary}"
    );

    let mapping = by_line(&read_jsonl(&summary.paths.mapping));
    assert_eq!(
        mapping.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3, 4, 5, 6, 7, 14])
    );
    // One token per card: the duplicates map to the first one's token, and exactly one line
    // of each card says `created` whatever order the concurrent requests ran in.
    for (a, b) in [(1, 6), (3, 7)] {
        assert_eq!(mapping[&a]["tokenId"], mapping[&b]["tokenId"]);
        let statuses: BTreeSet<_> = [&mapping[&a], &mapping[&b]]
            .iter()
            .map(|r| r["status"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            statuses,
            BTreeSet::from(["created".into(), "existing".into()])
        );
    }
    assert_eq!(mapping[&1]["ref"], "psp-1");
    assert_eq!(
        mapping[&14]["ref"], "14",
        "the line number when there is no ref"
    );
    assert_eq!(mapping[&2]["last4"], pans[1][12..].to_string());
    assert_eq!(mapping[&2]["tokenStatus"], "ACTIVE");
    for r in mapping.values() {
        let id = r["tokenId"].as_str().unwrap();
        let got = app.get(&format!("/v1/tokens/{id}"), &key).await;
        assert_eq!(got.status(), 200, "token {id} exists");
    }

    let errors = by_line(&read_jsonl(&summary.paths.errors));
    let code = |l: u64| {
        (
            errors[&l]["httpStatus"].as_u64(),
            errors[&l]["code"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(code(8), (Some(422), "invalid_card_number_luhn".into()));
    assert_eq!(code(9), (Some(422), "card_expired".into()));
    assert_eq!(code(10), (None, "malformed_line".into()));
    assert_eq!(code(11), (None, "invalid_field".into()));
    assert_eq!(code(12), (None, "missing_field".into()));
    assert_eq!(errors.len(), 5);
    assert_eq!(errors[&8]["ref"], "bad-luhn");
    assert!(errors.values().all(|e| e["retryable"] == false));

    assert_eq!(
        app.sim_stats().await["tokensCreated"],
        6,
        "one D1 token per card"
    );
    let mut all = pans.clone();
    all.extend([bad_luhn, pan(10), pan(11), pan(12), pan(13)]);
    assert_no_pan(&out, &all, &summary.to_string());

    // The same command again: everything is done, nothing is sent, nothing is added.
    let again = import(options(&app, &key, &file, &out)).await;
    assert!(again.complete);
    assert_eq!(
        (
            again.counts.skipped,
            again.counts.created,
            again.counts.existing,
            again.counts.errors
        ),
        (14, 0, 0, 0),
        "{again}"
    );
    assert_eq!(read_jsonl(&summary.paths.mapping).len(), 8);
    assert_eq!(read_jsonl(&summary.paths.errors).len(), 5);
    // The gateway still has one token per card.
    assert_eq!(
        token_of(&app, &key, &pans[0]).await,
        (200, mapping[&1]["tokenId"].as_str().unwrap().to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_csv_on_redis() {
    let app = TestApp::start(Backend::Redis).await;
    let (_, key) = app.create_merchant("CSV PSP").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cards.csv");
    let pans: Vec<String> = (100..104).map(pan).collect();
    let content = format!(
        "ref,number,expiryMonth,expiryYear,customerReference\n\
         a-1,{},12,2030,cust-1\n\
         \"a,2\",\"{}\",1,2031,\"cust \"\"two\"\"\"\n\
         a-3,{},12\n\
         a-4,{},12,2030,\n\
         a-5,{},6,2029,cust-5\n\
         a-6,12345,12,2030,\n",
        pans[0], pans[1], pans[2], pans[3], pans[0]
    );
    std::fs::write(&file, &content).unwrap();
    // Outputs next to the input by default.
    let mut opts = options(&app, &key, &file, dir.path());
    opts.out_dir = None;
    let summary = import(opts).await;
    assert!(summary.complete, "{summary}");
    assert_eq!(summary.paths.mapping, dir.path().join("cards.tokens.jsonl"));
    let c = summary.counts;
    assert_eq!((c.created, c.existing, c.errors), (3, 1, 2), "{summary}");

    let mapping = by_line(&read_jsonl(&summary.paths.mapping));
    // CSV lines count the header: the first card is on line 2.
    assert_eq!(
        mapping.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([2, 3, 5, 6])
    );
    assert_eq!(mapping[&3]["ref"], "a,2");
    assert_eq!(mapping[&2]["tokenId"], mapping[&6]["tokenId"]);
    let errors = by_line(&read_jsonl(&summary.paths.errors));
    assert_eq!(errors[&4]["code"], "malformed_line");
    assert_eq!(errors[&4]["ref"], "a-3");
    assert_eq!(errors[&7]["httpStatus"], 422);
    assert_eq!(errors[&7]["code"], "invalid_card_number");

    assert_no_pan(dir.path(), &pans, &summary.to_string());
}

/// The file of [`stopped_import_resumes_without_a_second_token`]: `n` distinct cards.
fn many_cards(dir: &Path, n: u64) -> (PathBuf, Vec<String>) {
    let file = dir.join("cards.jsonl");
    let pans: Vec<String> = (1000..1000 + n).map(pan).collect();
    let content: String = pans
        .iter()
        .enumerate()
        .map(|(i, p)| jsonl(&format!("r{i}"), p, 12, 2030))
        .collect();
    std::fs::write(&file, content).unwrap();
    (file, pans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_import_resumes_without_a_second_token() {
    let app = TestApp::start(Backend::Embedded).await;
    let (_, key) = app.create_merchant("Resuming PSP").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (file, pans) = many_cards(dir.path(), 60);

    // Run 1: a trial of 10 lines.
    let mut opts = options(&app, &key, &file, &out);
    opts.limit = Some(10);
    let first = import(opts).await;
    assert_eq!(first.stopped, Some(Stop::Limit));
    assert!(!first.complete);
    assert_eq!(first.counts.created, 10);

    // Run 2: slowed down, then stopped as Ctrl-C would, twice: the second stop abandons the
    // requests still in flight (their lines stay unfinished, resent by the next run).
    let mut opts = options(&app, &key, &file, &out);
    opts.rate = Some(20.0);
    opts.concurrency = 8;
    let mapping = opts.out_dir.clone().unwrap().join("cards.tokens.jsonl");
    let (tx, rx) = mpsc::unbounded_channel();
    let run = tokio::spawn(tokengate::import::run(opts, rx));
    // Stopped once it has got going (the outputs are flushed every second), not at a fixed
    // time: a busy machine may take long to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let flushed = || {
        std::fs::read_to_string(&mapping)
            .unwrap_or_default()
            .matches('\n')
            .count()
    };
    while flushed() < 12 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(()).unwrap();
    tx.send(()).unwrap();
    let second = run.await.unwrap().unwrap();
    assert_eq!(second.stopped, Some(Stop::Interrupted), "{second}");
    assert_eq!(second.counts.skipped, 10);
    let done_after_two = read_jsonl(&second.paths.mapping).len();
    assert!(
        (12..60).contains(&done_after_two),
        "stopped part-way: {done_after_two}"
    );

    // Run 3: the same command goes on to the end. On a loaded machine a line can end with a
    // retryable failure (a D1 or gateway timeout); the documented answer is to run the same
    // command again, which must then finish it without a second token.
    let mut third = import(options(&app, &key, &file, &out)).await;
    assert_eq!(third.counts.skipped as usize, done_after_two);
    for _ in 0..3 {
        if third.complete {
            break;
        }
        assert_eq!(third.counts.errors, 0, "{third}");
        assert!(third.counts.retryable > 0, "{third}");
        third = import(options(&app, &key, &file, &out)).await;
    }
    assert!(third.complete, "{third}");
    assert_eq!(third.counts.errors + third.counts.retryable, 0);

    let records = read_jsonl(&third.paths.mapping);
    assert_eq!(records.len(), 60, "every line mapped exactly once");
    let lines: BTreeSet<u64> = records
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, (1..=60).collect());
    let ids: BTreeSet<&str> = records
        .iter()
        .map(|r| r["tokenId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 60, "one token per card");
    // Lines resent after the stop were replayed or created once; never `existing`, which would
    // mean a first request had made a token that the mapping lost. The one exception is a line
    // whose earlier attempt ended in a retryable failure (a 503 keeps the card's reservation):
    // its resend finds that token, which is the same token (checked below), not a second one.
    let retried: BTreeSet<u64> = read_jsonl(&third.paths.errors)
        .iter()
        .filter(|e| e["retryable"] == true)
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    for r in &records {
        let line = r["line"].as_u64().unwrap();
        assert!(
            r["status"] == "created" || (r["status"] == "existing" && retried.contains(&line)),
            "line {line}: {r} (retried lines: {retried:?})"
        );
    }
    // The gateway agrees: each card already has exactly the mapped token.
    let mapped = by_line(&records);
    for (i, p) in pans.iter().enumerate().step_by(7) {
        let (status, id) = token_of(&app, &key, p).await;
        assert_eq!(status, 200);
        assert_eq!(id, mapped[&(i as u64 + 1)]["tokenId"].as_str().unwrap());
    }
    let state: Value = serde_json::from_slice(&std::fs::read(&third.paths.state).unwrap()).unwrap();
    assert_eq!(state["checkpoint"], 60);
    assert_eq!(state["complete"], true);
    assert_no_pan(&out, &pans, &third.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_import_retries_after_429_and_a_bad_key_stops_the_run() {
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__RATE_LIMIT__PER_KEY_PER_S", "10")
        .env("TOKENGATE__RATE_LIMIT__PER_KEY_BURST", "3")
        .start()
        .await;
    let (_, key) = app.create_merchant("Hasty PSP").await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = many_cards(dir.path(), 20);

    // Far above the gateway's limit, with no client-side limit: 429s, retried after their
    // Retry-After until every line is through.
    let mut opts = options(&app, &key, &file, &dir.path().join("a"));
    opts.concurrency = 8;
    let summary = import(opts).await;
    assert!(summary.complete, "{summary}");
    assert_eq!(summary.counts.created, 20, "{summary}");
    assert!(read_jsonl(&summary.paths.errors).is_empty());

    // A wrong key: the run stops at the first answer instead of refusing every line.
    let out = dir.path().join("b");
    let summary = import(options(&app, "tgk_not_a_key", &file, &out)).await;
    assert!(
        matches!(&summary.stopped, Some(Stop::Fatal(m)) if m.contains("unauthorized")),
        "{summary}"
    );
    assert!(!summary.complete);
    assert!(read_jsonl(&summary.paths.mapping).is_empty());
    assert!(read_jsonl(&summary.paths.errors).is_empty());
    let state: Value =
        serde_json::from_slice(&std::fs::read(&summary.paths.state).unwrap()).unwrap();
    assert_eq!(state["checkpoint"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_gateway_stops_the_run_and_the_next_run_retries_the_failed_lines() {
    // A high breaker threshold (every line reaches D1) and no D1 retries inside the gateway
    // (each line fails at once).
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__D1__BREAKER_FAILURE_THRESHOLD", "100000")
        .env("TOKENGATE__D1__MAX_RETRIES", "0")
        .start()
        .await;
    let (_, key) = app.create_merchant("Patient PSP").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (file, pans) = many_cards(dir.path(), 30);
    app.sim_faults(
        json!({"errorRates": {"503": 1.0}, "operations": ["createToken"], "retryAfterSeconds": 0}),
    )
    .await;

    let mut opts = options(&app, &key, &file, &out);
    opts.concurrency = 2;
    opts.retry.max_retries = 1;
    opts.retry.max_retry_after = Duration::from_millis(50);
    let first = import(opts).await;
    assert!(
        matches!(&first.stopped, Some(Stop::Unavailable(m)) if m.contains("d1_unavailable")),
        "{first}"
    );
    let errors = read_jsonl(&first.paths.errors);
    assert!((10..=12).contains(&errors.len()), "{}", errors.len());
    for e in &errors {
        assert_eq!(e["httpStatus"], 503);
        assert_eq!(e["code"], "d1_unavailable");
        assert_eq!(e["retryable"], true);
    }
    assert!(read_jsonl(&first.paths.mapping).is_empty());
    let state: Value = serde_json::from_slice(&std::fs::read(&first.paths.state).unwrap()).unwrap();
    assert_eq!(
        state["checkpoint"], 0,
        "the checkpoint never passes a failed line"
    );

    // D1 is back: the same command resends the failed lines and goes on to the end.
    app.sim_faults(json!({})).await;
    let second = import(options(&app, &key, &file, &out)).await;
    assert!(second.complete, "{second}");
    assert_eq!(second.counts.skipped, 0);
    assert_eq!(second.counts.created, 30, "{second}");
    assert_eq!(app.sim_stats().await["tokensCreated"], 30);
    assert_no_pan(&out, &pans, &second.to_string());
}
