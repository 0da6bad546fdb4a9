//! The import file as a stream of lines: JSON lines or CSV with a header row, read one line at a
//! time (never the whole file), the card number kept in memory that is wiped after use, and a
//! line that cannot be read reported without ever echoing its content.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::error::Category;
use tokio::sync::mpsc;
use zeroize::{Zeroize, Zeroizing};

/// The two accepted file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated, with a header row naming the columns.
    Csv,
}

impl Format {
    /// The format a file name implies: `.jsonl`, `.ndjson`, `.json` or `.csv`.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// One card to tokenize. The number is a `SecretString`: wiped when the line is dropped.
pub struct CardLine {
    /// Physical line number in the file (1-based; for CSV the line the record starts on).
    pub line: u64,
    /// The PSP's external reference, or the line number when the file has none.
    pub reference: String,
    pub number: SecretString,
    pub expiry_month: u16,
    pub expiry_year: u16,
    pub customer_reference: Option<String>,
}

/// Why a line could not be read. `detail` names fields, never their values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub code: &'static str,
    pub detail: String,
}

/// What the reader hands to the import loop, strictly in file order.
pub enum Item {
    Card(CardLine),
    Invalid {
        line: u64,
        reference: String,
        error: LineError,
    },
    /// A line finished by an earlier run, or a blank line: nothing to send.
    Skipped {
        line: u64,
        earlier: bool,
    },
}

/// A problem with the file as a whole (the run cannot go on).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read the input file: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Header(String),
}

/// Which lines the reader skips without parsing them: those at or below the checkpoint, and
/// those recorded as finished above it.
pub struct DoneLines {
    pub checkpoint: u64,
    pub above: HashSet<u64>,
}

impl DoneLines {
    fn contains(&self, line: u64) -> bool {
        line <= self.checkpoint || self.above.contains(&line)
    }
}

/// Longest JSON line accepted: a card line is a few hundred bytes; this bounds the memory a
/// broken file (no line breaks) can take.
const MAX_LINE: usize = 64 * 1024;

/// Reads `path` and sends its items on `tx` until the end of the file or until the receiver
/// is closed (the run stopped). Blocking: run it on `spawn_blocking`.
pub fn read(
    path: &Path,
    format: Format,
    done: &DoneLines,
    tx: &mpsc::Sender<Item>,
) -> Result<(), InputError> {
    let file = File::open(path)?;
    match format {
        Format::Jsonl => read_jsonl(file, done, tx),
        Format::Csv => read_csv(file, done, tx),
    }
}

/// Counts the lines of the file (for the progress bar's total), streaming.
pub fn count_lines(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    if last != b'\n' {
        lines += 1;
    }
    Ok(lines)
}

/// A buffered line reader whose buffers are wiped: `std::io::BufReader` would leave the file's
/// card numbers in its buffer after use.
struct LineReader {
    file: File,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
}

impl LineReader {
    fn new(file: File) -> LineReader {
        LineReader {
            file,
            buf: Zeroizing::new(vec![0u8; 64 * 1024]),
            start: 0,
            end: 0,
        }
    }

    /// Reads the next line into `out` (without the line break). Returns false at the end of
    /// the file, and `Ok(true)` with `too_long` set when the line was cut at [`MAX_LINE`] (the
    /// rest of it is consumed and dropped).
    fn next_line(&mut self, out: &mut Vec<u8>, too_long: &mut bool) -> io::Result<bool> {
        out.zeroize();
        out.clear();
        *too_long = false;
        let mut any = false;
        loop {
            if self.start == self.end {
                self.buf[..self.end].zeroize();
                self.start = 0;
                self.end = self.file.read(&mut self.buf)?;
                if self.end == 0 {
                    return Ok(any);
                }
            }
            any = true;
            let chunk = &self.buf[self.start..self.end];
            let (piece, found) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            if out.len() + piece.len() <= MAX_LINE {
                out.extend_from_slice(piece);
            } else {
                *too_long = true;
            }
            self.start += piece.len() + usize::from(found);
            if found {
                return Ok(true);
            }
        }
    }
}

fn read_jsonl(file: File, done: &DoneLines, tx: &mpsc::Sender<Item>) -> Result<(), InputError> {
    let mut reader = LineReader::new(file);
    // Room for a whole line up front, so growing it never leaves a copy of a card behind.
    let mut line_buf = Zeroizing::new(Vec::with_capacity(MAX_LINE));
    let mut too_long = false;
    let mut line = 0u64;
    while reader.next_line(&mut line_buf, &mut too_long)? {
        line += 1;
        let item = if done.contains(line) {
            Item::Skipped {
                line,
                earlier: true,
            }
        } else if too_long {
            Item::Invalid {
                line,
                reference: line.to_string(),
                error: LineError {
                    code: "malformed_line",
                    detail: format!("line longer than {MAX_LINE} bytes"),
                },
            }
        } else if line_buf.iter().all(u8::is_ascii_whitespace) {
            Item::Skipped {
                line,
                earlier: false,
            }
        } else {
            parse_json_line(line, &line_buf)
        };
        line_buf.zeroize();
        if tx.blocking_send(item).is_err() {
            // The run stopped: the receiver is gone.
            return Ok(());
        }
    }
    Ok(())
}

/// `ref` may be written as a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum RefValue {
    Text(String),
    Int(i64),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonLine {
    #[serde(rename = "ref", default)]
    reference: Option<RefValue>,
    #[serde(default)]
    number: Option<SecretString>,
    #[serde(default)]
    expiry_month: Option<u16>,
    #[serde(default)]
    expiry_year: Option<u16>,
    #[serde(default)]
    customer_reference: Option<String>,
}

/// The fields a line may have; an error message names one of these, nothing else from the line.
const FIELDS: [&str; 5] = [
    "ref",
    "number",
    "expiryMonth",
    "expiryYear",
    "customerReference",
];

fn parse_json_line(line: u64, bytes: &[u8]) -> Item {
    // serde would also read a struct from a JSON array, taking its first element (maybe a card
    // number) as `ref`: only objects are lines.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Item::Invalid {
            line,
            reference: line.to_string(),
            error: LineError {
                code: "malformed_line",
                detail: "the line is not a JSON object".to_owned(),
            },
        };
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<JsonLine, _> = serde_path_to_error::deserialize(de);
    match parsed {
        Ok(j) => {
            let reference = match j.reference {
                Some(RefValue::Text(s)) if !s.trim().is_empty() => s.trim().to_owned(),
                Some(RefValue::Int(n)) => n.to_string(),
                _ => line.to_string(),
            };
            card_line(
                line,
                reference,
                j.number,
                j.expiry_month,
                j.expiry_year,
                j.customer_reference,
            )
        }
        Err(e) => {
            // Neither the error's own message (serde quotes the offending value, which may be
            // the card number) nor the line is used: only the field name and the column.
            let field = e.path().to_string();
            let inner = e.into_inner();
            let error = match inner.classify() {
                Category::Data => match FIELDS.iter().find(|f| **f == field) {
                    Some(f) => LineError {
                        code: "invalid_field",
                        detail: format!("`{f}` has the wrong type or is out of range"),
                    },
                    None => LineError {
                        code: "malformed_line",
                        detail: "the line is not a JSON object".to_owned(),
                    },
                },
                Category::Syntax | Category::Eof | Category::Io => LineError {
                    code: "malformed_line",
                    detail: format!("not valid JSON (column {})", inner.column()),
                },
            };
            Item::Invalid {
                line,
                reference: line.to_string(),
                error,
            }
        }
    }
}

/// Checks the required fields; their values are the gateway's to validate (Luhn, expiry), so
/// the rules live in one place.
fn card_line(
    line: u64,
    reference: String,
    number: Option<SecretString>,
    expiry_month: Option<u16>,
    expiry_year: Option<u16>,
    customer_reference: Option<String>,
) -> Item {
    use secrecy::ExposeSecret;
    if looks_like_card_number(&reference) {
        // A reference column mapped from the card number would copy it into the outputs.
        return Item::Invalid {
            line,
            reference: line.to_string(),
            error: LineError {
                code: "invalid_field",
                detail: "`ref` looks like a card number".to_owned(),
            },
        };
    }
    let missing = match (&number, expiry_month, expiry_year) {
        (None, _, _) => Some("number"),
        (Some(n), _, _) if n.expose_secret().trim().is_empty() => Some("number"),
        (_, None, _) => Some("expiryMonth"),
        (_, _, None) => Some("expiryYear"),
        _ => None,
    };
    match (missing, number, expiry_month, expiry_year) {
        (None, Some(number), Some(expiry_month), Some(expiry_year)) => Item::Card(CardLine {
            line,
            reference,
            number,
            expiry_month,
            expiry_year,
            customer_reference: customer_reference.filter(|c| !c.is_empty()),
        }),
        (field, ..) => Item::Invalid {
            line,
            reference,
            error: LineError {
                code: "missing_field",
                detail: format!("`{}` is missing", field.unwrap_or("number")),
            },
        },
    }
}

/// 12 to 19 digits (spaces and dashes aside) passing the Luhn check: what the gateway would
/// take as a card number.
pub fn looks_like_card_number(s: &str) -> bool {
    let mut digits = 0usize;
    let mut sum = 0u32;
    for c in s.chars().rev() {
        match c {
            ' ' | '-' => continue,
            '0'..='9' => {
                let mut d = c as u32 - '0' as u32;
                if digits % 2 == 1 {
                    d *= 2;
                    if d > 9 {
                        d -= 9;
                    }
                }
                sum += d;
                digits += 1;
            }
            _ => return false,
        }
    }
    (12..=19).contains(&digits) && sum.is_multiple_of(10)
}

/// Column positions, from the header row.
struct Columns {
    reference: Option<usize>,
    number: usize,
    expiry_month: usize,
    expiry_year: usize,
    customer_reference: Option<usize>,
}

impl Columns {
    fn from_header(header: &csv::ByteRecord) -> Result<Columns, InputError> {
        let find = |name: &str| {
            header.iter().position(|h| {
                std::str::from_utf8(h)
                    .map(|h| h.trim().eq_ignore_ascii_case(name))
                    .unwrap_or(false)
            })
        };
        // The header is not echoed either: a file without one has a card on its first line.
        let need = |name: &str| {
            find(name).ok_or_else(|| {
                InputError::Header(format!(
                    "the CSV header row has no `{name}` column (expected columns: ref, number, \
                     expiryMonth, expiryYear, customerReference)"
                ))
            })
        };
        Ok(Columns {
            reference: find("ref"),
            number: need("number")?,
            expiry_month: need("expiryMonth")?,
            expiry_year: need("expiryYear")?,
            customer_reference: find("customerReference"),
        })
    }
}

fn read_csv(file: File, done: &DoneLines, tx: &mpsc::Sender<Item>) -> Result<(), InputError> {
    // `flexible`: a row with the wrong number of fields is a per-line error, not the end of
    // the run. The csv crate's own buffers are not wiped (docs/api.md, "Bulk import").
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(file);
    let header = rdr.byte_headers().map_err(csv_error)?.clone();
    let columns = Columns::from_header(&header)?;
    let mut record = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(e) => return Err(csv_error(e)),
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let item = if done.contains(line) {
            Item::Skipped {
                line,
                earlier: true,
            }
        } else {
            parse_csv_record(line, &record, &columns, header.len())
        };
        if tx.blocking_send(item).is_err() {
            return Ok(());
        }
    }
}

/// A CSV error without its message's context: only I/O errors can happen on a flexible reader
/// of byte records, and those carry no data from the file.
fn csv_error(e: csv::Error) -> InputError {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => InputError::Io(e),
        _ => InputError::Header("the CSV file cannot be read".to_owned()),
    }
}

fn parse_csv_record(
    line: u64,
    record: &csv::ByteRecord,
    columns: &Columns,
    header_len: usize,
) -> Item {
    let text = |i: usize| -> Result<Option<&str>, LineError> {
        match record.get(i) {
            None => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
                .map_err(|_| LineError {
                    code: "invalid_field",
                    detail: format!("column {} is not UTF-8", i + 1),
                }),
        }
    };
    let reference = columns
        .reference
        .and_then(|i| text(i).ok().flatten())
        .map(str::to_owned)
        .unwrap_or_else(|| line.to_string());
    let invalid = |reference: String, error: LineError| Item::Invalid {
        line,
        reference,
        error,
    };
    if looks_like_card_number(&reference) {
        return invalid(
            line.to_string(),
            LineError {
                code: "invalid_field",
                detail: "`ref` looks like a card number".to_owned(),
            },
        );
    }
    if record.len() != header_len {
        return invalid(
            reference,
            LineError {
                code: "malformed_line",
                detail: format!(
                    "the row has {} fields, the header {header_len}",
                    record.len()
                ),
            },
        );
    }
    let number = match text(columns.number) {
        Ok(n) => n.map(|n| SecretString::from(n.to_owned())),
        Err(e) => return invalid(reference, e),
    };
    let int = |i: usize, name: &str| -> Result<Option<u16>, LineError> {
        match text(i)? {
            None => Ok(None),
            Some(s) => s.parse::<u16>().map(Some).map_err(|_| LineError {
                code: "invalid_field",
                detail: format!("`{name}` is not a number in range"),
            }),
        }
    };
    let month = match int(columns.expiry_month, "expiryMonth") {
        Ok(m) => m,
        Err(e) => return invalid(reference, e),
    };
    let year = match int(columns.expiry_year, "expiryYear") {
        Ok(y) => y,
        Err(e) => return invalid(reference, e),
    };
    let customer_reference = match columns.customer_reference.map(text) {
        Some(Ok(c)) => c.map(str::to_owned),
        Some(Err(e)) => return invalid(reference, e),
        None => None,
    };
    card_line(line, reference, number, month, year, customer_reference)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use secrecy::ExposeSecret;

    const PAN: &str = "4111111111111111";

    fn collect(content: &str, format: Format, done: DoneLines) -> Vec<Item> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, content).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        read(&path, format, &done, &tx).unwrap();
        drop(tx);
        let mut out = Vec::new();
        while let Ok(i) = rx.try_recv() {
            out.push(i);
        }
        out
    }

    fn none() -> DoneLines {
        DoneLines {
            checkpoint: 0,
            above: HashSet::new(),
        }
    }

    fn error_of(item: &Item) -> &LineError {
        match item {
            Item::Invalid { error, .. } => error,
            _ => panic!("not invalid"),
        }
    }

    #[test]
    fn jsonl_lines_parse_and_errors_never_echo_the_line() {
        let content = format!(
            "{{\"ref\":\"a\",\"number\":\"{PAN}\",\"expiryMonth\":12,\"expiryYear\":2030,\"customerReference\":\"c1\"}}\n\
             \n\
             {{\"number\":\"{PAN}\",\"expiryMonth\":\"{PAN}\",\"expiryYear\":2030}}\n\
             {{\"number\":\"{PAN}\",\"expiryMonth\":1\n\
             [\"{PAN}\"]\n\
             {{\"ref\":7,\"expiryMonth\":1,\"expiryYear\":2030}}\n\
             {{\"number\":\"{PAN}\",\"expiryMonth\":1,\"expiryYear\":2030}}"
        );
        let items = collect(&content, Format::Jsonl, none());
        assert_eq!(items.len(), 7);
        match &items[0] {
            Item::Card(c) => {
                assert_eq!((c.line, c.reference.as_str()), (1, "a"));
                assert_eq!(c.number.expose_secret(), PAN);
                assert_eq!((c.expiry_month, c.expiry_year), (12, 2030));
                assert_eq!(c.customer_reference.as_deref(), Some("c1"));
            }
            _ => panic!("line 1"),
        }
        assert!(matches!(
            items[1],
            Item::Skipped {
                line: 2,
                earlier: false
            }
        ));
        assert_eq!(error_of(&items[2]).code, "invalid_field");
        assert_eq!(error_of(&items[3]).code, "malformed_line");
        assert_eq!(error_of(&items[4]).code, "malformed_line");
        assert_eq!(error_of(&items[5]).code, "missing_field");
        match &items[5] {
            Item::Invalid { reference, .. } => assert_eq!(reference, "7"),
            _ => panic!(),
        }
        match &items[4] {
            Item::Invalid { reference, .. } => assert_eq!(reference, "5"),
            _ => panic!(),
        }
        // The last line has no line break.
        assert!(matches!(&items[6], Item::Card(c) if c.line == 7 && c.reference == "7"));
        for i in &items[2..6] {
            let e = error_of(i);
            assert!(!e.detail.contains("4111"), "{e:?}");
        }
    }

    #[test]
    fn a_reference_that_is_a_card_number_is_refused_and_not_kept() {
        let content = format!(
            "{{\"ref\":\"{PAN}\",\"number\":\"{PAN}\",\"expiryMonth\":1,\"expiryYear\":2030}}\n\
             {{\"ref\":\"4111111111111112\",\"number\":\"{PAN}\",\"expiryMonth\":1,\"expiryYear\":2030}}\n"
        );
        let items = collect(&content, Format::Jsonl, none());
        match &items[0] {
            Item::Invalid {
                reference, error, ..
            } => {
                assert_eq!(reference, "1");
                assert_eq!(error.code, "invalid_field");
            }
            _ => panic!("a card number as ref"),
        }
        // Not Luhn-valid: an ordinary reference.
        assert!(matches!(&items[1], Item::Card(_)));
        assert!(looks_like_card_number("4111 1111-1111 1111"));
        assert!(!looks_like_card_number("12345"));
    }

    #[test]
    fn jsonl_skips_done_lines_without_parsing_them() {
        let content = "not json\nnot json\nnot json\nnot json\n";
        let done = DoneLines {
            checkpoint: 2,
            above: [4].into_iter().collect(),
        };
        let items = collect(content, Format::Jsonl, done);
        let kinds: Vec<_> = items
            .iter()
            .map(|i| match i {
                Item::Skipped { earlier: true, .. } => 's',
                Item::Invalid { .. } => 'e',
                _ => '?',
            })
            .collect();
        assert_eq!(kinds, ['s', 's', 'e', 's']);
    }

    #[test]
    fn overlong_json_line_is_one_error_and_reading_goes_on() {
        let long = "x".repeat(MAX_LINE + 10);
        let content =
            format!("{long}\n{{\"number\":\"{PAN}\",\"expiryMonth\":1,\"expiryYear\":2030}}\n");
        let items = collect(&content, Format::Jsonl, none());
        assert_eq!(items.len(), 2);
        assert_eq!(error_of(&items[0]).code, "malformed_line");
        assert!(matches!(&items[1], Item::Card(c) if c.line == 2));
    }

    #[test]
    fn csv_rows_parse_by_header_and_bad_rows_are_line_errors() {
        let content = format!(
            "ref,number,expiryMonth,expiryYear,customerReference\n\
             r1,{PAN},12,2030,c1\n\
             r2,{PAN},{PAN},2030,c2\n\
             r3,{PAN},12\n\
             \"r,4\",\"{PAN}\",1,2031,\n\
             ,,1,2031,\n"
        );
        let items = collect(&content, Format::Csv, none());
        assert_eq!(items.len(), 5);
        assert!(
            matches!(&items[0], Item::Card(c) if c.line == 2 && c.reference == "r1"
            && c.customer_reference.as_deref() == Some("c1"))
        );
        assert_eq!(error_of(&items[1]).code, "invalid_field");
        assert_eq!(error_of(&items[2]).code, "malformed_line");
        assert!(matches!(&items[3], Item::Card(c) if c.reference == "r,4"
            && c.customer_reference.is_none() && c.number.expose_secret() == PAN));
        assert_eq!(error_of(&items[4]).code, "missing_field");
        match &items[4] {
            Item::Invalid { reference, .. } => assert_eq!(reference, "6"),
            _ => panic!(),
        }
    }

    #[test]
    fn csv_without_header_is_refused_without_echoing_the_first_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, format!("{PAN},12,2030\n")).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let e = read(&path, Format::Csv, &none(), &tx).unwrap_err();
        assert!(!e.to_string().contains("4111"), "{e}");
    }

    #[test]
    fn format_from_extension_and_line_count() {
        assert_eq!(
            Format::from_path(Path::new("a/cards.JSONL")),
            Some(Format::Jsonl)
        );
        assert_eq!(Format::from_path(Path::new("cards.csv")), Some(Format::Csv));
        assert_eq!(Format::from_path(Path::new("cards.txt")), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n");
        std::fs::write(&p, "a\nb\nc").unwrap();
        assert_eq!(count_lines(&p).unwrap(), 3);
        std::fs::write(&p, "a\nb\n").unwrap();
        assert_eq!(count_lines(&p).unwrap(), 2);
    }
}
