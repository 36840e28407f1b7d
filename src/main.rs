//! The `setar-engine` command line.

use clap::{Parser, Subcommand};
use setar_engine::backend::cpu::CpuBackend;
use setar_engine::backend::Backend;
use setar_engine::config::ClipConfig;
use setar_engine::embed::{run_embed, EmbedJob};
use setar_engine::model::random::{preset, write_random_model};
use setar_engine::model::Clip;
use setar_engine::progress::Progress;
use setar_engine::tokenizer::Tokenizer;
use setar_engine::weights::{DiskDtype, SaveDtype, WeightsFile};
use setar_engine::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "setar-engine",
    version,
    about = "SeTAR out-of-distribution detection with a hand-written CLIP"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress bars or chatter (for scripts).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a checkpoint's sizes, dtypes and parameter count, and check it loads.
    Info {
        /// A `.safetensors` file or a folder holding `model.safetensors`.
        #[arg(long)]
        weights: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Embed images and prompts: image_embeds, image_local_embeds, text_embeds, logit_scale.
    Embed {
        #[arg(long)]
        weights: PathBuf,
        /// Folder of images (searched recursively; JPEG, PNG, WebP).
        #[arg(long)]
        images: PathBuf,
        /// Text file, one prompt per line.
        #[arg(long)]
        prompts: PathBuf,
        /// Output `.safetensors`.
        #[arg(long)]
        out: PathBuf,
        /// Images per forward batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// List the compute devices this build can use.
    Devices,
    /// Write a random CLIP (model.safetensors + config.json) in the real HF layout.
    InitRandom {
        #[arg(long, value_parser = ["vit-b-16", "vit-b-32", "vit-l-14", "tiny"])]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = SaveDtype::F32)]
        dtype: SaveDtype,
    },
}

/// Opens a checkpoint and its sizes (config.json beside it, else inferred).
fn open(weights: &Path) -> Result<(WeightsFile, ClipConfig)> {
    let file = WeightsFile::open(weights)?;
    let config = ClipConfig::for_weights(&file)?;
    Ok((file, config))
}

fn info(weights: &Path, json: bool) -> Result<()> {
    let (file, config) = open(weights)?;
    let model = Clip::load(CpuBackend::new(), &file, &config)?;
    let mut dtypes: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in file.tensors().values() {
        *dtypes.entry(t.dtype.name()).or_default() += 1;
    }
    let skipped = file
        .tensors()
        .values()
        .filter(|t| t.dtype == DiskDtype::I64)
        .count();
    let bytes = std::fs::metadata(file.path())
        .map_err(|e| Error::io(file.path(), e))?
        .len();
    let (v, t) = (&config.vision, &config.text);
    if json {
        let out = serde_json::json!({
            "weights": file.path(),
            "file_bytes": bytes,
            "tensors": file.tensors().len(),
            "parameters": file.parameter_count(),
            "dtypes": dtypes,
            "skipped_buffers": skipped,
            "config_source": config.source,
            "config": config.to_hf_json(),
            "logit_scale": model.logit_scale,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    let dts: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} × {n}")).collect();
    println!(
        "weights     {} ({:.1} MB)",
        file.path().display(),
        bytes as f64 / 1e6
    );
    println!(
        "tensors     {} ({}; {skipped} position_ids buffers skipped)",
        file.tensors().len(),
        dts.join(", ")
    );
    println!("parameters  {}", file.parameter_count());
    println!("sizes from  {}", config.source);
    println!(
        "vision      {} layers, width {}, heads {}, mlp {}, patch {}, image {} ({}×{} patches), {}, eps {:e}",
        v.tower.layers, v.tower.hidden, v.tower.heads, v.tower.intermediate, v.patch_size, v.image_size,
        v.grid(), v.grid(), v.tower.act.hf_name(), v.tower.eps
    );
    println!(
        "text        {} layers, width {}, heads {}, mlp {}, vocab {}, context {}, {}, eps {:e}",
        t.tower.layers,
        t.tower.hidden,
        t.tower.heads,
        t.tower.intermediate,
        t.vocab_size,
        t.context_length,
        t.tower.act.hf_name(),
        t.tower.eps
    );
    println!(
        "projection  {}, logit_scale {:.4} (exp {:.2})",
        config.projection_dim,
        model.logit_scale,
        model.logit_scale.exp()
    );
    println!("check       every tensor present and of the right shape, no NaN/inf");
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::invalid(format!("--threads {n}: {e}")))?;
    }
    let progress = Progress { quiet: cli.quiet };
    match cli.command {
        Command::Info { weights, json } => info(&weights, json),
        Command::Embed {
            weights,
            images,
            prompts,
            out,
            batch,
        } => {
            let start = Instant::now();
            let (file, config) = open(&weights)?;
            let tokenizer = Tokenizer::for_model_dir(file.path().parent())?;
            let model = Clip::load(CpuBackend::new(), &file, &config)?;
            let job = EmbedJob {
                images_dir: &images,
                prompts_file: &prompts,
                out: &out,
                batch,
                progress,
            };
            let (n, t) = run_embed(&model, &tokenizer, &job)?;
            if !cli.quiet {
                eprintln!(
                    "embedded {n} images and {t} prompts in {:.1} s on {} → {}",
                    start.elapsed().as_secs_f64(),
                    model.backend.name(),
                    out.display()
                );
            }
            Ok(())
        }
        Command::Devices => {
            println!("cpu {}", CpuBackend::new().name());
            #[cfg(feature = "cuda")]
            match setar_engine::backend::cuda::devices() {
                Ok(devs) => devs.iter().for_each(|d| println!("{d}")),
                Err(e) => println!("cuda: none ({e})"),
            }
            #[cfg(not(feature = "cuda"))]
            println!("cuda: not built (rebuild with --features cuda)");
            Ok(())
        }
        Command::InitRandom {
            preset: name,
            out,
            seed,
            dtype,
        } => {
            let config = preset(&name)?;
            write_random_model(&config, &out, seed, dtype)?;
            if !cli.quiet {
                eprintln!(
                    "wrote random {name} ({dtype:?}, seed {seed}) to {}",
                    out.display()
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    setar_engine::backend::cpu::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
