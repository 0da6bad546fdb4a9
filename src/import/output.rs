//! What an import leaves behind: the mapping file (line -> token), the errors file, and the
//! state file (run key and checkpoint) from which a re-run resumes. None of them ever holds a
//! card number: only what the API answers (token id, status, last four digits).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::input::Format;

/// The three files of an import of `<dir>/<stem>.<ext>`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub mapping: PathBuf,
    pub errors: PathBuf,
    pub state: PathBuf,
}

impl Paths {
    /// `<out>/<stem>.tokens.jsonl`, `<out>/<stem>.errors.jsonl`, `<out>/<stem>.import-state.json`;
    /// `out` defaults to the input's directory.
    pub fn new(input: &Path, out: Option<&Path>) -> Paths {
        let dir = match out {
            Some(d) => d.to_path_buf(),
            None => input
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let stem = input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "import".to_owned());
        Paths {
            mapping: dir.join(format!("{stem}.tokens.jsonl")),
            errors: dir.join(format!("{stem}.errors.jsonl")),
            state: dir.join(format!("{stem}.import-state.json")),
        }
    }
}

/// One line of the mapping file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MappingRecord {
    pub line: u64,
    #[serde(rename = "ref")]
    pub reference: String,
    pub token_id: String,
    /// `created` or `existing` (the merchant already had a token for this card).
    pub status: String,
    /// The token's status as answered (`ACTIVE`, `PENDING`, ...).
    pub token_status: String,
    /// The card's last four digits, as the API answered them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last4: Option<String>,
}

/// One line of the errors file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorRecord {
    pub line: u64,
    #[serde(rename = "ref")]
    pub reference: String,
    /// The gateway's HTTP status; `null` for a line that could not be read or sent.
    pub http_status: Option<u16>,
    pub code: String,
    pub detail: String,
    /// True when a later run resends the line (it failed for a reason that may pass).
    pub retryable: bool,
}

/// The state file: written atomically (temporary file, then rename) at each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    /// Random, created by the first run: keys the lines' `Idempotency-Key`s, so a resumed run
    /// sends the same keys and files imported separately never share one.
    pub run_key: String,
    pub format: Format,
    /// Every line up to this one is finished (in the mapping or errors file).
    pub checkpoint: u64,
    /// True once a run reached the end of the file with every line finished.
    pub complete: bool,
}

/// What a re-run knows from the files of earlier runs.
pub struct Resume {
    pub state: Option<State>,
    /// Lines above the checkpoint that are finished (mapped, or refused for good).
    pub done_above: HashSet<u64>,
}

#[derive(Deserialize)]
struct LineOnly {
    line: u64,
    #[serde(default)]
    retryable: bool,
}

/// Reads the state and the finished lines above its checkpoint. Lines that do not parse (a
/// run killed in the middle of a write) are ignored: their lines are simply sent again.
pub fn load_resume(paths: &Paths) -> io::Result<Resume> {
    let state = match std::fs::read(&paths.state) {
        Ok(b) => Some(serde_json::from_slice::<State>(&b).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not an import state file (remove it to start over)",
                    paths.state.display()
                ),
            )
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let checkpoint = state.as_ref().map_or(0, |s| s.checkpoint);
    let mut done_above = HashSet::new();
    for path in [&paths.mapping, &paths.errors] {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).split(b'\n') {
            let line = line?;
            if let Ok(r) = serde_json::from_slice::<LineOnly>(&line)
                && r.line > checkpoint
                && !r.retryable
            {
                done_above.insert(r.line);
            }
        }
    }
    Ok(Resume { state, done_above })
}

/// The mapping and errors files, appended to.
pub struct Writers {
    mapping: BufWriter<File>,
    errors: BufWriter<File>,
}

impl Writers {
    pub fn open(paths: &Paths) -> io::Result<Writers> {
        Ok(Writers {
            mapping: BufWriter::new(open_append(&paths.mapping)?),
            errors: BufWriter::new(open_append(&paths.errors)?),
        })
    }

    pub fn mapping(&mut self, r: &MappingRecord) -> io::Result<()> {
        write_line(&mut self.mapping, r)
    }

    pub fn error(&mut self, r: &ErrorRecord) -> io::Result<()> {
        write_line(&mut self.errors, r)
    }

    /// Flushes both files to the disk: done before a checkpoint names their lines finished.
    pub fn sync(&mut self) -> io::Result<()> {
        for w in [&mut self.mapping, &mut self.errors] {
            w.flush()?;
            w.get_ref().sync_data()?;
        }
        Ok(())
    }
}

fn write_line<T: Serialize>(w: &mut BufWriter<File>, r: &T) -> io::Result<()> {
    serde_json::to_writer(&mut *w, r)?;
    w.write_all(b"\n")
}

/// Opens for appending; a file whose last line was cut by a killed run gets a line break first,
/// so the next record is not glued to the broken one.
fn open_append(path: &Path) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = f.metadata()?.len();
    if len > 0 {
        f.seek(SeekFrom::Start(len - 1))?;
        let mut last = [0u8; 1];
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
        }
    }
    Ok(f)
}

/// Writes the state file atomically: a crash leaves the old or the new one, never half.
pub fn write_state(path: &Path, state: &State) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = File::create(&tmp)?;
        serde_json::to_writer_pretty(&mut f, state)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn resume_reads_finished_lines_above_the_checkpoint_and_survives_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("cards.jsonl"), None);
        assert!(paths.mapping.ends_with("cards.tokens.jsonl"));
        write_state(
            &paths.state,
            &State {
                version: 1,
                run_key: "00".into(),
                format: Format::Jsonl,
                checkpoint: 3,
                complete: false,
            },
        )
        .unwrap();
        std::fs::write(
            &paths.mapping,
            "{\"line\":2,\"ref\":\"a\",\"tokenId\":\"t\",\"status\":\"created\",\"tokenStatus\":\"ACTIVE\"}\n\
             {\"line\":5,\"ref\":\"b\",\"tokenId\":\"t\",\"status\":\"created\",\"tokenStatus\":\"ACTIVE\"}\n\
             {\"line\":9,\"ref\":\"c\",\"tok",
        )
        .unwrap();
        std::fs::write(
            &paths.errors,
            "{\"line\":6,\"ref\":\"6\",\"httpStatus\":422,\"code\":\"x\",\"detail\":\"d\",\"retryable\":false}\n\
             {\"line\":7,\"ref\":\"7\",\"httpStatus\":503,\"code\":\"y\",\"detail\":\"d\",\"retryable\":true}\n",
        )
        .unwrap();
        let r = load_resume(&paths).unwrap();
        assert_eq!(r.state.unwrap().checkpoint, 3);
        let mut done: Vec<_> = r.done_above.into_iter().collect();
        done.sort();
        assert_eq!(done, [5, 6]);

        let mut w = Writers::open(&paths).unwrap();
        w.mapping(&MappingRecord {
            line: 9,
            reference: "c".into(),
            token_id: "t".into(),
            status: "created".into(),
            token_status: "ACTIVE".into(),
            last4: None,
        })
        .unwrap();
        w.sync().unwrap();
        let text = std::fs::read_to_string(&paths.mapping).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("{\"line\":9,"), "{text}");
    }
}
