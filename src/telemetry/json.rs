//! The JSON line format of the log, with a direct path for the access-log line.
//!
//! tracing-subscriber's JSON formatter builds a `serde_json::Value` for each field and, for the
//! current span, parses the span's stored fields back from JSON: about 7% of the gateway's CPU
//! per GET went to formatting the one access-log line of each request (docs/performance.md,
//! "GET path profile, round 2"). Access-log events (target [`super::ACCESS_TARGET`]) are
//! written here field by field straight into the line, with the same keys, values and JSON
//! types as the stock formatter; every other event goes to the stock formatter unchanged.
//!
//! A line logged while a request is handled gets the request context (`context.rs`) as its
//! `span`, exactly as the stock formatter writes the `request` span the context replaces,
//! unless another span is current (the JSON format shows only the innermost span).

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::clock::CachedSystemTime;
use super::context;

/// `log.format = "json"`: the stock formatter (flattened event fields, the current span, no
/// span list) for every event but the access-log line, which is written directly.
pub struct JsonLines {
    stock: Format<Json, CachedSystemTime>,
    timer: CachedSystemTime,
}

impl JsonLines {
    pub fn new() -> Self {
        Self {
            stock: tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_timer(CachedSystemTime),
            timer: CachedSystemTime,
        }
    }
}

thread_local! {
    /// The buffer of a stock line that gets the request context spliced in, kept between lines.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// `,"span":{"request_id":…,"route":…,"name":"request"}`: the stock formatter's `span` for a
/// `request` span with these two string fields (its stored fields parsed into a sorted map,
/// then the name).
fn write_request_span(w: &mut Writer<'_>, request_id: &str, route: &str) -> fmt::Result {
    w.write_str(",\"span\":{\"request_id\":")?;
    write_str_escaped(w, request_id)?;
    w.write_str(",\"route\":")?;
    write_str_escaped(w, route)?;
    w.write_str(",\"name\":")?;
    write_str_escaped(w, context::SPAN_NAME)?;
    w.write_char('}')
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // The span the stock formatter shows: the event's own parent, else the current one.
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if meta.target() != super::ACCESS_TARGET {
            if span.is_some() {
                return self.stock.format_event(ctx, w, event);
            }
            let spliced = context::with(|request_id, route| {
                // The stock line ends with `}` and a newline: the span goes before them.
                let mut line = |buf: &mut String| {
                    buf.clear();
                    self.stock.format_event(ctx, Writer::new(buf), event)?;
                    let Some(body) = buf.strip_suffix("}\n") else {
                        return w.write_str(buf);
                    };
                    w.write_str(body)?;
                    write_request_span(&mut w, request_id, route)?;
                    w.write_str("}\n")
                };
                match SCRATCH.try_with(|s| s.try_borrow_mut().ok().map(|mut b| line(&mut b))) {
                    Ok(Some(r)) => r,
                    // A line formatted while another is (a `Debug` impl that logs), or a
                    // thread being torn down: a buffer of its own.
                    _ => line(&mut String::new()),
                }
            });
            return match spliced {
                Some(r) => r,
                None => self.stock.format_event(ctx, w, event),
            };
        }
        // The stock formatter's key order: timestamp, level, the event's fields, target, span.
        w.write_str("{\"timestamp\":\"")?;
        self.timer.format_time(&mut w)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_char('"')?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        write_str_escaped(&mut w, meta.target())?;
        if span.is_none() {
            context::with(|request_id, route| write_request_span(&mut w, request_id, route))
                .unwrap_or(Ok(()))?;
        } else if let Some(span) = span {
            w.write_str(",\"span\":{")?;
            let ext = span.extensions();
            // The span's fields as JsonFields stored them: one JSON object, spliced in
            // without parsing it again.
            if let Some(inner) = ext
                .get::<FormattedFields<N>>()
                .and_then(|f| f.fields.strip_prefix('{'))
                .and_then(|f| f.strip_suffix('}'))
                .filter(|f| !f.trim().is_empty())
            {
                w.write_str(inner)?;
                w.write_char(',')?;
            }
            w.write_str("\"name\":")?;
            write_str_escaped(&mut w, span.name())?;
            w.write_char('}')?;
        }
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`, with the JSON type the stock formatter gives it.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.w.write_char(',')?;
            write_str_escaped(self.w, field.name())?;
            self.w.write_char(':')?;
            value(self.w)
        })();
    }
}

/// A float as serde_json writes it (`Value::from(f64)`): null when not finite.
fn write_f64(w: &mut impl fmt::Write, value: f64) -> fmt::Result {
    if !value.is_finite() {
        return w.write_str("null");
    }
    if let Some(milli) = thousandths(value) {
        // The access log's `latency_ms` (microseconds / 1000) on every line: the same text as
        // `{:?}`, written as two integers instead of through the float formatter.
        let (int, frac) = (milli / 1000, milli % 1000);
        write!(w, "{int}.")?;
        return match frac {
            0 => w.write_char('0'),
            f if f % 100 == 0 => write!(w, "{}", f / 100),
            f if f % 10 == 0 => write!(w, "{:02}", f / 10),
            f => write!(w, "{f:03}"),
        };
    }
    write!(w, "{value:?}")
}

/// `value` as a whole number of thousandths, when it is exactly the double nearest to one
/// (`m as f64 / 1000.0`), positive and below 10^12. Then `{:?}` (the shortest text that reads
/// back as `value`) is that decimal: with at most 15 significant digits no other decimal as
/// short lies within the double's rounding interval, and in this range `{:?}` uses no exponent.
fn thousandths(value: f64) -> Option<u64> {
    if !(value.is_sign_positive() && value < 1e12) {
        return None;
    }
    let m = (value * 1000.0).round();
    (m / 1000.0 == value).then_some(m as u64)
}

impl Visit for Fields<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |w| write_f64(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| write_str_escaped(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// The span fields of `log.format = "json"`: the JSON object tracing-subscriber's `JsonFields`
/// stores for a span (keys sorted, a later value of a key replacing an earlier one), written
/// directly when every field is a string, an integer, a bool or a float, as the `request`
/// span's are. `JsonFields` builds a `serde_json::Value` per field and a map per span: about 2%
/// of a GET's CPU, for a span every request opens (docs/performance.md, "GET path, round 3").
/// Any other field kind, and fields recorded on a span after it was created, go through
/// `JsonFields`' own code, so the stored text is the same in every case.
pub struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut w: Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut c = Collect::default();
        fields.record(&mut c);
        if c.other {
            return tracing_subscriber::fmt::format::JsonFields::new().format_fields(w, fields);
        }
        // A stable sort, then the last of equal keys: what inserting into a BTreeMap gives.
        c.fields.sort_by_key(|(name, _)| *name);
        w.write_char('{')?;
        let mut first = true;
        for (i, (name, range)) in c.fields.iter().enumerate() {
            if c.fields.get(i + 1).is_some_and(|(next, _)| next == name) {
                continue;
            }
            if !first {
                w.write_char(',')?;
            }
            first = false;
            write_str_escaped(&mut w, name)?;
            w.write_char(':')?;
            w.write_str(&c.buf[range.clone()])?;
        }
        w.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        // As `JsonFields::add_fields`: the stored object parsed, the new fields added over it.
        let mut new = String::new();
        self.format_fields(Writer::new(&mut new), fields)?;
        let mut map: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&current.fields).map_err(|_| fmt::Error)?;
        let added: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&new).map_err(|_| fmt::Error)?;
        map.extend(added);
        current.fields = serde_json::to_string(&map).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

/// The fields of one span, each value already written as JSON into `buf`.
#[derive(Default)]
struct Collect {
    buf: String,
    fields: Vec<(&'static str, std::ops::Range<usize>)>,
    /// A field of another kind (debug, bytes, error, 128-bit): `JsonFields` writes them all.
    other: bool,
}

impl Collect {
    fn push(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        let start = self.buf.len();
        if value(&mut Writer::new(&mut self.buf)).is_err() {
            self.other = true;
        }
        self.fields.push((field.name(), start..self.buf.len()));
    }
}

impl Visit for Collect {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, |w| write_f64(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, |w| write_str_escaped(w, value));
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn fmt::Debug) {
        self.other = true;
    }
}

/// A JSON string literal.
fn write_str_escaped(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what passes through it for the inside of a JSON string (RFC 8259: the quote, the
/// backslash and the control characters), in runs so plain text is copied in one piece.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Nearly every string of a log line needs no escape: one pass without early exit (which
        // the compiler vectorises) finds that, and the text is copied in one piece.
        let plain = !s.bytes().fold(false, |esc, b| {
            esc | (b < 0x20) | (b == b'"') | (b == b'\\')
        });
        if plain {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let esc: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if esc.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(esc)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::telemetry::test_buf::Buf;

    #[test]
    fn floats_are_written_as_debug_writes_them() {
        let mut values: Vec<f64> = vec![
            0.0,
            -0.0,
            0.001,
            0.01,
            0.1,
            1.0,
            1.5,
            1.05,
            1.005,
            12.345,
            999.999,
            1000.0,
            0.0005,
            1e-7,
            123_456_789.123,
            999_999_999_999.999,
            1e12,
            1e15,
            1e16,
            1e17,
            -1.5,
            f64::MIN_POSITIVE,
            f64::MAX,
            0.1 + 0.2,
            1.0 / 3.0,
        ];
        // Latencies as the access log makes them: microseconds / 1000.
        values.extend((0..200_000u64).map(|us| us as f64 / 1000.0));
        values.extend((0..2_000u64).map(|i| (i * 7_919_731) as f64 / 1000.0));
        values.extend(
            (0..2_000u64).map(|i| f64::from_bits(0x3f50_0000_0000_0000 + i * 0x1234_5678_9abc)),
        );
        for v in values {
            let mut ours = String::new();
            write_f64(&mut ours, v).unwrap();
            assert_eq!(ours, format!("{v:?}"), "{v:e}");
        }
        let mut nan = String::new();
        write_f64(&mut nan, f64::NAN).unwrap();
        assert_eq!(nan, "null");
    }

    /// The same events through the stock formatter, then through [`JsonLines`]: each line as
    /// parsed JSON.
    fn both(emit: impl Fn()) -> Vec<Value> {
        let mut out = Vec::new();
        for fast in [false, true] {
            let buf = Buf::default();
            let w = buf.clone();
            let builder = tracing_subscriber::fmt()
                .with_writer(move || w.clone())
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            let d = if fast {
                tracing::Dispatch::new(builder.event_format(JsonLines::new()).finish())
            } else {
                tracing::Dispatch::new(builder.finish())
            };
            tracing::dispatcher::with_default(&d, &emit);
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            for line in text.lines() {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                out.push(v);
            }
        }
        out
    }

    fn same_but_time(a: &Value, b: &Value) {
        let (mut a, mut b) = (a.clone(), b.clone());
        assert!(b["timestamp"].as_str().unwrap().ends_with('Z'), "{b}");
        assert_eq!(
            a["timestamp"].as_str().unwrap().len(),
            b["timestamp"].as_str().unwrap().len()
        );
        a["timestamp"] = Value::Null;
        b["timestamp"] = Value::Null;
        assert_eq!(a, b);
    }

    /// Events inside spans through the stock formatter, with `JsonFields` then [`SpanFields`]
    /// storing the spans' fields: each line as parsed JSON.
    fn both_span_fields(emit: impl Fn()) -> (Vec<Value>, Vec<Value>) {
        let mut out = Vec::new();
        for fast in [false, true] {
            let buf = Buf::default();
            let w = buf.clone();
            let builder = tracing_subscriber::fmt()
                .with_writer(move || w.clone())
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true);
            let d = if fast {
                tracing::Dispatch::new(builder.fmt_fields(SpanFields).finish())
            } else {
                tracing::Dispatch::new(builder.finish())
            };
            tracing::dispatcher::with_default(&d, &emit);
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
            out.push(lines);
        }
        let fast = out.pop().unwrap();
        (out.pop().unwrap(), fast)
    }

    #[test]
    fn span_fields_are_what_json_fields_stores() {
        let (stock, fast) = both_span_fields(|| {
            let span = tracing::info_span!("request", request_id = "r-\"1\"\n", route = "/v1/{id}");
            let _e = span.enter();
            tracing::info!(a = 1, "plain");
            let inner = tracing::info_span!(
                "inner",
                n = -3i64,
                u = 7u64,
                f = 0.5,
                nan = f64::NAN,
                yes = true,
                later = tracing::field::Empty
            );
            let _i = inner.enter();
            tracing::info!("nested");
            inner.record("later", "now");
            inner.record("n", 9i64);
            tracing::warn!("recorded");
            let dbg = tracing::info_span!("dbg", d = ?Some(1), s = "x");
            let _d = dbg.enter();
            tracing::info!("debug field");
            let empty = tracing::info_span!("empty");
            let _m = empty.enter();
            tracing::info!("no fields");
        });
        assert_eq!(stock.len(), 5);
        assert_eq!(fast.len(), 5);
        for (a, b) in stock.iter().zip(&fast) {
            let (mut a, mut b) = (a.clone(), b.clone());
            a["timestamp"] = Value::Null;
            b["timestamp"] = Value::Null;
            assert_eq!(a, b);
        }
        assert_eq!(fast[0]["span"]["request_id"], "r-\"1\"\n");
        assert_eq!(fast[2]["span"]["later"], "now");
        assert_eq!(fast[2]["span"]["n"], 9);
        assert_eq!(fast[1]["span"]["nan"], Value::Null);
    }

    #[test]
    fn span_fields_text_is_json_fields_text() {
        use tracing_subscriber::fmt::format::JsonFields;
        // The stored strings themselves, not only their parse: a subscriber that hands each
        // span's attributes to both.
        struct Both;
        impl tracing::Subscriber for Both {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                let mut a = String::new();
                let mut b = String::new();
                JsonFields::new()
                    .format_fields(Writer::new(&mut a), attrs)
                    .unwrap();
                SpanFields
                    .format_fields(Writer::new(&mut b), attrs)
                    .unwrap();
                assert_eq!(a, b);
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, _: &Event<'_>) {}
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        tracing::subscriber::with_default(Both, || {
            let _s = tracing::info_span!(
                "request",
                request_id = "0b7d-\u{1}é",
                route = "/v1/tokens/{id}"
            );
            let _t = tracing::info_span!("t", z = 1u64, a = -2i64, m = true, f = 1.5, q = "\"");
            let _u = tracing::info_span!("u");
        });
    }

    #[test]
    fn access_lines_are_what_the_stock_formatter_writes() {
        let lines = both(|| {
            tracing::info!(target: "tokengate::access", method = "GET", route = "/v1/tokens/{id}",
                status = 200u16, latency_ms = 0.125, request_id = "abc", "request");
            tracing::warn!(target: "tokengate::access", method = "POST", route = "unmatched",
                status = 503u16, latency_ms = f64::NAN, request_id = "q\"uo\\te\n\u{1}é", "request");
            let span = tracing::info_span!("request", request_id = "r-1", route = "/x");
            let _e = span.enter();
            tracing::info!(target: "tokengate::access", neg = -3i64, yes = true, dbg = ?Some("x"),
                "in a span {}", 7);
            tracing::info!(target: "tokengate::other", status = 1u8, "not an access line");
        });
        assert_eq!(lines.len(), 8);
        for i in 0..4 {
            same_but_time(&lines[i], &lines[i + 4]);
        }
        assert_eq!(lines[4]["status"], 200);
        assert_eq!(lines[4]["latency_ms"], 0.125);
        assert_eq!(lines[5]["level"], "WARN");
        assert_eq!(lines[5]["latency_ms"], Value::Null);
        assert_eq!(lines[5]["request_id"], "q\"uo\\te\n\u{1}é");
        assert_eq!(lines[6]["span"]["request_id"], "r-1");
        assert_eq!(lines[6]["span"]["name"], "request");
        assert_eq!(lines[6]["message"], "in a span 7");
    }

    /// The lines of `emit` inside a real `request` span through the stock JSON formatter, then
    /// inside a request context through [`JsonLines`] (with [`SpanFields`]): byte for byte but
    /// the timestamp.
    #[test]
    fn lines_in_a_request_are_those_of_the_request_span() {
        fn emit() {
            tracing::info!(a = 1, "plain");
            tracing::warn!(b = "two", e = ?Some(3), "warned");
            let inner = tracing::info_span!("inner", n = 3);
            inner.in_scope(|| tracing::info!("nested"));
            tracing::error!("after the nested span");
        }
        let route = "/v1/tokens/{id}";
        for request_id in ["0b7d3f1e-9c4a-4e2b-8f6d-123456789012", "q\"uo\\te", "-"] {
            let stock_buf = Buf::default();
            let w = stock_buf.clone();
            let stock = tracing_subscriber::fmt()
                .with_writer(move || w.clone())
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish();
            tracing::subscriber::with_default(stock, || {
                tracing::info_span!("request", request_id, route).in_scope(emit);
            });
            let ours_buf = Buf::default();
            let w = ours_buf.clone();
            let ours = tracing_subscriber::fmt()
                .with_writer(move || w.clone())
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .event_format(JsonLines::new())
                .fmt_fields(SpanFields)
                .finish();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            tracing::subscriber::with_default(ours, || {
                let ctx = context::RequestContext {
                    request_id: http::HeaderValue::from_static(request_id),
                    route: route.into(),
                };
                rt.block_on(context::scope(Some(ctx), async { emit() }));
                tracing::info!("outside");
            });
            // The timestamp is the first value: `{"timestamp":"…Z",` (27 characters).
            let strip = |b: &Buf| -> Vec<String> {
                String::from_utf8(b.0.lock().unwrap().clone())
                    .unwrap()
                    .lines()
                    .map(|l| {
                        assert!(l.starts_with("{\"timestamp\":\""), "{l}");
                        l[14 + 27..].to_owned()
                    })
                    .collect()
            };
            let stock = strip(&stock_buf);
            let mut ours = strip(&ours_buf);
            let outside = ours.pop().unwrap();
            assert!(!outside.contains("span"), "{outside}");
            assert_eq!(stock.len(), 4);
            assert_eq!(stock, ours);
            let v: Value = serde_json::from_str(&format!("{{\"t\":\"{}", ours[0])).unwrap();
            assert_eq!(v["span"]["request_id"], request_id);
            assert_eq!(v["span"]["route"], route);
            assert_eq!(v["span"]["name"], "request");
        }
    }
}
