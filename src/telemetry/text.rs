//! The text line format of the log (`log.format = "text"`, and `auto` on a terminal):
//! tracing-subscriber's default ("full") format, with the request context (`context.rs`)
//! written where the `request` span it replaces was: `request{request_id=".." route=".."}:`
//! after the level, before any other span and the target.

use std::cell::RefCell;
use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::clock::CachedSystemTime;
use super::context;

/// The stock format, once without and once with colour codes: a line with a request context
/// is first written into a buffer (whose `Writer` has no colour setting of its own), then
/// copied out with the context inserted.
pub struct TextLines {
    plain: Format<Full, CachedSystemTime>,
    ansi: Format<Full, CachedSystemTime>,
}

impl TextLines {
    pub fn new() -> Self {
        let stock = tracing_subscriber::fmt::format().with_timer(CachedSystemTime);
        Self {
            plain: stock.clone().with_ansi(false),
            ansi: stock.with_ansi(true),
        }
    }
}

thread_local! {
    /// The buffer of a line with a request context, kept between lines.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<S, N> FormatEvent<S, N> for TextLines
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
        let ansi = w.has_ansi_escapes();
        let stock = if ansi { &self.ansi } else { &self.plain };
        let Some(result) = context::with(|request_id, route| {
            let mut line = |buf: &mut String| {
                buf.clear();
                stock.format_event(ctx, Writer::new(buf), event)?;
                let other_spans = ctx.event_scope().is_some();
                // The span list starts right after the level and its space (the timestamp
                // before it holds neither a space-padded level nor a colour code but dim).
                let level = level_text(*event.metadata().level(), ansi);
                let at = buf
                    .find(level)
                    .map(|i| i + level.len())
                    .filter(|&i| buf.as_bytes().get(i) == Some(&b' '))
                    .map_or(0, |i| i + 1);
                if at == 0 {
                    // Not the stock layout: the line as it is rather than a garbled one.
                    return w.write_str(buf);
                }
                w.write_str(&buf[..at])?;
                write_request_span(&mut w, request_id, route, ansi)?;
                if !other_spans {
                    w.write_char(' ')?;
                }
                w.write_str(&buf[at..])
            };
            match SCRATCH.try_with(|s| s.try_borrow_mut().ok().map(|mut b| line(&mut b))) {
                Ok(Some(r)) => r,
                // A line formatted while another is (a `Debug` impl that logs), or a thread
                // being torn down: a buffer of its own.
                _ => line(&mut String::new()),
            }
        }) else {
            return stock.format_event(ctx, w, event);
        };
        result
    }
}

/// The level as the stock format writes it (`FmtLevel`): padded to five, coloured on a
/// terminal.
fn level_text(level: Level, ansi: bool) -> &'static str {
    match (level, ansi) {
        (Level::TRACE, false) => "TRACE",
        (Level::DEBUG, false) => "DEBUG",
        (Level::INFO, false) => " INFO",
        (Level::WARN, false) => " WARN",
        (Level::ERROR, false) => "ERROR",
        (Level::TRACE, true) => "\x1b[35mTRACE\x1b[0m",
        (Level::DEBUG, true) => "\x1b[34mDEBUG\x1b[0m",
        (Level::INFO, true) => "\x1b[32m INFO\x1b[0m",
        (Level::WARN, true) => "\x1b[33m WARN\x1b[0m",
        (Level::ERROR, true) => "\x1b[31mERROR\x1b[0m",
    }
}

/// `request{request_id="…" route="…"}:` as the stock format writes a span with these two
/// string fields (stored by `DefaultFields`): name and braces bold, field names italic, `=`
/// and `:` dimmed on a terminal; values as Rust debug strings.
fn write_request_span(
    w: &mut Writer<'_>,
    request_id: &str,
    route: &str,
    ansi: bool,
) -> fmt::Result {
    let (bold, italic, dim, reset) = if ansi {
        ("\x1b[1m", "\x1b[3m", "\x1b[2m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    write!(
        w,
        "{bold}{name}{reset}{bold}{{{reset}\
         {italic}request_id{reset}{dim}={reset}{request_id:?} \
         {italic}route{reset}{dim}={reset}{route:?}\
         {bold}}}{reset}{dim}:{reset}",
        name = context::SPAN_NAME,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::test_buf::Buf;

    /// The lines without their timestamps (the text before the first space).
    fn lines(buf: &Buf) -> Vec<String> {
        String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| l.split_once(' ').unwrap().1.to_owned())
            .collect()
    }

    /// The same events logged inside a real `request` span through the stock format, then
    /// inside a request context through [`TextLines`].
    fn both(ansi: bool, request_id: &'static str, emit: fn()) -> (Vec<String>, Vec<String>) {
        let route = "/v1/tokens/{id}";
        let stock_buf = Buf::default();
        let w = stock_buf.clone();
        let stock = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(ansi)
            .finish();
        tracing::subscriber::with_default(stock, || {
            let span = tracing::info_span!("request", request_id, route);
            span.in_scope(emit);
        });
        let ours_buf = Buf::default();
        let w = ours_buf.clone();
        let ours = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(ansi)
            .event_format(TextLines::new())
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
            // Outside the request: no context.
            tracing::info!("after");
        });
        let mut ours = lines(&ours_buf);
        let after = ours.pop().unwrap();
        assert!(
            after.ends_with("after") && !after.contains("request"),
            "{after}"
        );
        (lines(&stock_buf), ours)
    }

    fn emit() {
        tracing::info!(a = 1, "plain");
        tracing::warn!(b = "two", "warned");
        tracing::error!("failed");
        let inner = tracing::info_span!("inner", n = 3);
        inner.in_scope(|| tracing::info!("nested"));
        let empty = tracing::info_span!("empty");
        empty.in_scope(|| tracing::info!(target: "other::target", "nested, no fields"));
    }

    #[test]
    fn lines_in_a_request_are_those_of_the_request_span() {
        for ansi in [false, true] {
            for id in ["0b7d3f1e-9c4a-4e2b-8f6d-123456789012", "q\"uo\\te", "-"] {
                let (stock, ours) = both(ansi, id, emit);
                assert_eq!(stock.len(), 5);
                assert_eq!(stock, ours, "ansi {ansi}");
            }
        }
        let (stock, _) = both(false, "abc", emit);
        assert_eq!(
            stock[0],
            " INFO request{request_id=\"abc\" route=\"/v1/tokens/{id}\"}: \
             tokengate::telemetry::text::tests: plain a=1"
        );
        assert!(stock[3].contains("}:inner{n=3}: "), "{}", stock[3]);
    }
}
