//! The `tokengate` binary: `serve` runs the gateway, `d1-sim` the D1 simulator, `keys` manages
//! key material, `openapi` prints the OpenAPI document, `import` migrates stored cards through a
//! running gateway's API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokengate::app::{Gateway, shutdown_signal};
use tokengate::config::{Config, Overrides};

/// jemalloc instead of glibc malloc: allocation was about 15% of the gateway's CPU per request in
/// the GET profile. mimalloc was measured too: as fast, but more memory per idle connection
/// (docs/performance.md has the figures).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tokengate",
    version,
    about = "Network-tokenization gateway for PSPs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded defaults: sandbox mode, embedded store, in-process D1 simulator).
    Serve {
        /// TOML file layered over the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (server.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Use Redis at this URL instead of the embedded store (storage.redis_url).
        #[arg(long)]
        redis_url: Option<String>,
        /// Directory of the embedded store (storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where the sandbox D1 simulator listens (sim.listen).
        #[arg(long)]
        sim_listen: Option<SocketAddr>,
    },
    /// Run the D1 simulator on its own (development keys are loaded from, or written to,
    /// `--keys-dir`, default `./sim-keys`).
    D1Sim {
        /// D1 API listener (mutual TLS).
        #[arg(long, default_value = "127.0.0.1:8765")]
        listen: SocketAddr,
        /// Control API listener (plain HTTP: `/sim/faults`, `/sim/tokens/{id}/events`, `/sim/stats`).
        #[arg(long, default_value = "127.0.0.1:8766")]
        control_listen: SocketAddr,
        /// Development key set to use (written there when missing).
        #[arg(long)]
        keys_dir: Option<PathBuf>,
        /// Gateway base URL that notifications are posted to.
        #[arg(long)]
        notify_url: Option<String>,
        /// Merchant gateway id for a newly generated key set.
        #[arg(long)]
        merchant_gateway_id: Option<String>,
    },
    /// Print the OpenAPI 3.1 document (the one served at `GET /openapi.json`) to stdout, so it
    /// can be checked and used without a running gateway (scripts/check-openapi.sh).
    Openapi,
    /// Tokenize the cards of a JSON-lines or CSV file through a running gateway's API
    /// (`POST /v1/tokens`), resumable: re-run the same command after a stop (docs/api.md,
    /// "Bulk import").
    Import(Box<ImportArgs>),
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(clap::Args)]
struct ImportArgs {
    /// Base URL of the gateway, e.g. https://tokengate.internal:8443.
    #[arg(long)]
    api: String,
    /// Merchant API key with the `tokens:write` scope (better: TOKENGATE_API_KEY).
    #[arg(long, env = "TOKENGATE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Cards to import: JSON lines (.jsonl) or CSV with a header row (.csv).
    #[arg(long)]
    file: PathBuf,
    /// File format, when the extension does not tell.
    #[arg(long, value_enum)]
    format: Option<tokengate::import::input::Format>,
    /// Directory of the mapping, errors and state files (default: the input's directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per second at most, e.g. 200 or 200/s (default: no client-side limit; the
    /// gateway's 429s are honoured either way).
    #[arg(long, value_parser = tokengate::import::parse_rate)]
    rate: Option<f64>,
    /// `usage` of the tokens.
    #[arg(long, default_value = "CARD_ON_FILE", value_parser = ["CARD_ON_FILE", "RECURRING", "ONE_OFF"])]
    usage: String,
    /// Stop after this many lines in this run (a trial run; re-run to go on).
    #[arg(long)]
    limit: Option<u64>,
    /// Retries of a line on 429, 503 and other temporary failures.
    #[arg(long, default_value_t = 8)]
    max_retries: u32,
    /// Progress display on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: tokengate::import::progress::ProgressMode,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random 256-bit key, base64 (for vault.keys and vault.fingerprint_key).
    New,
    /// Add a new random data-encryption key to a config file's [vault] keys and make it
    /// vault.active_key_id (comments kept). Then roll the instances: new records are sealed
    /// with it, and the re-encryption job re-seals older ones (docs/security.md).
    Rotate {
        /// The TOML config file holding [vault] keys and active_key_id (rewritten in place).
        #[arg(long)]
        config: PathBuf,
        /// Id of the new key (default: k<N+1> after the highest k<N>).
        #[arg(long)]
        key_id: Option<String>,
        /// Also add a new random fingerprint key to [vault] fingerprint_keys (the current one
        /// stays) and make it vault.active_fingerprint_key_id; once the instances are rolled,
        /// the re-index job moves the dedup index onto it (docs/security.md).
        #[arg(long)]
        fingerprint_key: bool,
        /// Id of the new fingerprint key (default: fp<N+1> after the highest fp<N>).
        #[arg(long, requires = "fingerprint_key")]
        fingerprint_key_id: Option<String>,
    },
    /// Write a development key set (test CA, D1 server and gateway client certificates, ES256
    /// and JWE key pairs) for the D1 simulator and a gateway pointed at it. NOT for production.
    GenerateDev {
        /// Directory to write (created; private keys get mode 0600).
        #[arg(long, default_value = "sim-keys")]
        out: PathBuf,
        /// Merchant gateway id the client certificate is issued to.
        #[arg(long, default_value = "tokengate-sandbox")]
        merchant_gateway_id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokengate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokengate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            redis_url,
            data_dir,
            sim_listen,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            cfg.apply(&Overrides {
                listen,
                redis_url,
                data_dir,
                sim_listen,
            });
            // Held to the end of `serve`: dropping it writes out the buffered log lines.
            let _log = tokengate::telemetry::init(&cfg.log);
            let listener = tokio::net::TcpListener::bind(cfg.server.listen).await?;
            let addr = listener.local_addr()?;
            let gw = Gateway::build(&cfg, addr).await?;
            tracing::info!(%addr, mode = ?cfg.mode, "tokengate listening");
            gw.run(listener, shutdown_signal()).await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::D1Sim {
            listen,
            control_listen,
            keys_dir,
            notify_url,
            merchant_gateway_id,
        } => {
            let _log = tokengate::telemetry::init(&tokengate::config::LogConfig::standalone());
            tokengate_d1_sim::run_cli(tokengate_d1_sim::SimCliArgs {
                listen,
                control_listen,
                keys_dir,
                notify_url,
                merchant_gateway_id,
            })
            .await?;
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::GenerateDev {
                    out,
                    merchant_gateway_id,
                },
        } => {
            let m = tokengate_d1_protocol::devkeys::DevMaterial::generate(&merchant_gateway_id)?;
            m.write_to(&out)?;
            println!(
                "development key set (NOT for production) written to {}",
                out.display()
            );
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    config,
                    key_id,
                    fingerprint_key,
                    fingerprint_key_id,
                },
        } => {
            use tokengate::config::rotate::{rotate_data_key, rotate_fingerprint_key};
            let text = std::fs::read_to_string(&config)
                .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
            let key = new_key_b64();
            let mut rotated = rotate_data_key(&text, key_id.as_deref(), &key)
                .map_err(|e| format!("{}: {e}", config.display()))?;
            // Both keys in one rewrite: the file is written once, with both or neither.
            let fp_key_id = if fingerprint_key {
                let fp = rotate_fingerprint_key(
                    &rotated.text,
                    fingerprint_key_id.as_deref(),
                    &new_key_b64(),
                )
                .map_err(|e| format!("{}: {e}", config.display()))?;
                rotated.text = fp.text;
                Some(fp.key_id)
            } else {
                None
            };
            // Written next to the file and renamed over it: a crash leaves the old or the new
            // file, never half of one. The copy keeps the original's permissions (keys inside).
            let tmp = config.with_extension("rotate.tmp");
            std::fs::copy(&config, &tmp)
                .and_then(|_| std::fs::write(&tmp, rotated.text.as_bytes()))
                .and_then(|_| std::fs::rename(&tmp, &config))
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            println!(
                "{}: added data key `{}` and made it vault.active_key_id. Roll the gateway instances; \
                 keep the older keys until tokengate_rekey_old_key_records reads 0.",
                config.display(),
                rotated.key_id
            );
            if let Some(id) = fp_key_id {
                println!(
                    "{}: added fingerprint key `{id}` and made it vault.active_fingerprint_key_id. \
                     Roll every instance; remove the older fingerprint key once \
                     tokengate_fp_reindex_complete reads 1.",
                    config.display()
                );
            }
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::New,
        } => {
            println!("{}", new_key_b64().as_str());
            Ok(())
        }
        Command::Import(args) => run_import(*args).await,
        Command::Openapi => {
            println!("{}", tokengate::http::openapi::document());
            Ok(())
        }
    }
}

/// `tokengate import`: the summary goes to stdout, progress to stderr. Exit status: 0 when every
/// line is finished without error (or a `--limit` run ended), 2 when some lines were refused
/// (see the errors file), 1 when lines are left to do (stopped, or failures that may pass:
/// re-run to resume).
async fn run_import(args: ImportArgs) -> Result<(), Box<dyn std::error::Error>> {
    use tokengate::import::{Options, Stop};
    let mut opts = Options::new(
        args.api,
        secrecy::SecretString::from(args.api_key),
        args.file,
    );
    opts.format = args.format;
    opts.out_dir = args.out;
    opts.concurrency = args.concurrency;
    opts.rate = args.rate;
    opts.usage = args.usage;
    opts.limit = args.limit;
    opts.retry.max_retries = args.max_retries;
    opts.progress = args.progress;
    // Every Ctrl-C (or SIGTERM) is a stop request: the first finishes what is in flight, the
    // second abandons it.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            shutdown_signal().await;
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    let summary = tokengate::import::run(opts, rx).await?;
    println!("{summary}");
    let finished = summary.complete || summary.stopped == Some(Stop::Limit);
    match (finished, summary.counts.errors) {
        (true, 0) => Ok(()),
        (true, _) => std::process::exit(2),
        (false, _) => std::process::exit(1),
    }
}

/// A new random 256-bit key, base64 (vault data keys and the fingerprint key).
fn new_key_b64() -> zeroize::Zeroizing<String> {
    use base64::Engine;
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    rand::fill(&mut k[..]);
    zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&k[..]))
}
