use clap::{Parser, Subcommand};
use tiergate::config::{Config, LogFormat, Overrides};

#[derive(Parser)]
#[command(name = "tiergate", version, about = "LLM-routing decision service")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gRPC service (embedded default config unless --config).
    Serve(Overrides),
    /// Fit the route and verify heads on the training split; print dev-split figures.
    Train(tiergate::eval::train::TrainArgs),
    /// Put a sample of each training benchmark's prompts on the router's scale
    /// (models/benchmarks.json), for catalog priors from published accuracy.
    Benchmarks(tiergate::eval::benchmarks::BenchmarksArgs),
    /// Fit per-model parameters and the verifier's re-fit on labelled rows of your own traffic;
    /// write them as an overlay (`overlays` in the config).
    Calibrate(tiergate::eval::calibrate::CalibrateArgs),
    /// Which cheap models to ask together (the gateway's consensus policy) on labelled rows of
    /// your own traffic, and what that saved there, cross-fitted.
    Consensus(tiergate::eval::consensus::ConsensusArgs),
    /// Measure per-channel activation ranges on train data for the int8 encoder's smoothing
    /// (writes models/int8-act-max.json; rebuild to embed it).
    CalibrateInt8(tiergate::eval::calibrate_int8::CalibrateInt8Args),
    /// Fit Route's fast-path student (static word vectors mapped onto the encoder) on train prompts.
    DistillStatic(tiergate::eval::distill_static::DistillStaticArgs),
    /// Score rows offline: p_route and p_verify per row, JSONL out (the evaluation interface).
    Score(tiergate::eval::score::ScoreArgs),
    /// Replay labelled rows: cost–quality curves, savings, APGR, router/verifier figures.
    Eval(tiergate::eval::replay::EvalArgs),
    /// Compare the CUDA backend with the CPU and time it (needs a GPU; see benches/GPU.md).
    GpuCheck(tiergate::tools::gpu_check::GpuCheckArgs),
    /// Write the encoder with f16 tensors (half the size), e.g. to carry to a GPU machine.
    ExportF16 {
        /// Encoder directory to read.
        #[arg(long, default_value = "models/base")]
        model_dir: std::path::PathBuf,
        /// Directory to write (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Call a running server (Route, Verify, Info, Health) and print the reply as JSON.
    Call(tiergate::tools::client::CallArgs),
    /// Print the effective configuration (after file, env and flags) as TOML.
    Config(Overrides),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `serve` reads its log format from its configuration, so it starts logging once loaded.
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        init_logging(LogFormat::Text);
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Log lines on stderr, filtered by RUST_LOG (default info). Colour only on a terminal that
/// did not ask for none: a log file or collector gets plain text.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(
                std::io::stderr().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .init(),
        // The request's span (rpc, request id, trace id) rides along on every line.
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(o) => {
            let cfg = Config::load(&o)?;
            init_logging(cfg.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            // The gateway's entry points sit beside the server, so they are wired in here.
            let attach: tiergate::server::Attach = Box::new(|svc, drain| {
                Box::pin(async move {
                    let g = tiergate::gateway::start(svc, drain).await?;
                    Ok(tiergate::server::Attached {
                        routes: g.routes,
                        tasks: g.tasks,
                    })
                })
            });
            rt.block_on(tiergate::server::serve_with(
                cfg,
                Some(o),
                tiergate::server::shutdown_signal(),
                Some(attach),
            ))
        }
        Cmd::Train(a) => tiergate::eval::train::run(a),
        Cmd::Benchmarks(a) => tiergate::eval::benchmarks::run(a),
        Cmd::Calibrate(a) => tiergate::eval::calibrate::run(a),
        Cmd::Consensus(a) => tiergate::eval::consensus::run(a),
        Cmd::CalibrateInt8(a) => tiergate::eval::calibrate_int8::run(a),
        Cmd::DistillStatic(a) => tiergate::eval::distill_static::run(a),
        Cmd::Score(a) => tiergate::eval::score::run(a),
        Cmd::Eval(a) => tiergate::eval::replay::run(a),
        Cmd::Call(a) => tiergate::tools::client::run(a),
        Cmd::GpuCheck(a) => tiergate::tools::gpu_check::run(a),
        Cmd::ExportF16 { model_dir, out } => {
            let n = tiergate::model::encoder::export_f16(&model_dir, &out)?;
            println!(
                "{}: {:.1} MiB",
                out.join("model.safetensors").display(),
                n as f64 / (1u64 << 20) as f64
            );
            Ok(())
        }
        Cmd::Config(o) => {
            let cfg = Config::load(&o)?;
            print!("{}", toml::to_string(&cfg)?);
            Ok(())
        }
    }
}
