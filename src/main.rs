//! The `setar-engine` command line.

use clap::{Args, Parser, Subcommand};
use setar_engine::backend::cpu::CpuBackend;
use setar_engine::backend::Backend;
use setar_engine::config::ClipConfig;
use setar_engine::data::LabelSet;
use setar_engine::embed::{run_embed, EmbedJob};
use setar_engine::jobs::{self, SettingsFile};
use setar_engine::loss::{Averaging, LocoopConfig};
use setar_engine::lowrank::{PruneType, WeightType};
use setar_engine::model::random::{preset, write_random_model};
use setar_engine::model::Clip;
use setar_engine::progress::Progress;
use setar_engine::report::{self, EvalMeta};
use setar_engine::score::Scorer;
use setar_engine::search::{Objective, Order, SearchConfig};
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
    /// Where the model runs: cpu, or cuda[:N] (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32 (CPU and CUDA), bf16 or f16 (CUDA); for `init-random`, the dtype of
    /// the written weights.
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
    /// With --device cuda: the most device memory our tensors may hold, e.g. 24G (binary
    /// units); the search's --batch is lowered to fit, and going past it is a clean
    /// out-of-memory error.
    #[arg(long, global = true, value_name = "SIZE")]
    max_memory: Option<String>,
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
        /// Images per forward batch (default: 32 on the CPU, 256 on CUDA).
        #[arg(long, value_parser = positive_batch)]
        batch: Option<usize>,
    },
    /// Search low-rank settings on an ID validation split (an ImageFolder).
    Search {
        #[command(flatten)]
        model: ModelArgs,
        /// ID validation split: one sub-folder per class.
        #[arg(long)]
        id_val: PathBuf,
        /// Label set: imagenet1k, voc, or a file with one class name per line.
        #[arg(long, default_value = "imagenet1k")]
        labels: String,
        #[command(flatten)]
        search: SearchArgs,
        /// Output folder (the search state there makes an interrupted search resume).
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate settings: ID accuracy and OOD metrics per OOD set, scores, plots.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Settings from `search` (lora_settings.json); without it the vanilla model is evaluated.
        #[arg(long)]
        settings: Option<PathBuf>,
        /// ID test split: one sub-folder per class.
        #[arg(long)]
        id_test: PathBuf,
        /// An OOD set as NAME=DIR (repeat for several).
        #[arg(long = "ood", value_parser = parse_ood, required = true)]
        ood: Vec<(String, PathBuf)>,
        #[arg(long, default_value = "imagenet1k")]
        labels: String,
        #[command(flatten)]
        eval: EvalArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Search, then evaluate: the whole SeTAR job. With no arguments it runs on the demo data
    /// (demo/) with openai/clip-vit-base-patch16 from the Hugging Face hub cache.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// ID dataset folder with `val/` and `test/` ImageFolders (default: demo/id).
        #[arg(long)]
        id: Option<PathBuf>,
        /// OOD sets as NAME=DIR (default: every folder of demo/ood).
        #[arg(long = "ood", value_parser = parse_ood)]
        ood: Vec<(String, PathBuf)>,
        /// Label set (default: demo/labels.txt for the demo, else imagenet1k).
        #[arg(long)]
        labels: Option<String>,
        #[command(flatten)]
        search: SearchArgs,
        #[command(flatten)]
        eval: EvalArgs,
        #[arg(long, default_value = "setar-run")]
        out: PathBuf,
    },
    /// Write the low-rank model (same layout: HF transformers and this engine load it).
    Apply {
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        settings: PathBuf,
        #[arg(long)]
        out: PathBuf,
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
    },
}

#[derive(Args, Clone, Debug)]
struct ModelArgs {
    /// A `.safetensors` file or a folder holding `model.safetensors` (default:
    /// openai/clip-vit-base-patch16 from the Hugging Face hub cache, downloaded if online).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Images per forward batch (default: 32 on the CPU, 256 on CUDA).
    #[arg(long, value_parser = positive_batch)]
    batch: Option<usize>,
}

/// `--batch` is a count of images: zero would make no progress.
fn positive_batch(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl ModelArgs {
    /// `--batch`, or the backend's own default.
    fn batch_for<B: Backend>(&self, backend: &B) -> usize {
        self.batch.unwrap_or_else(|| backend.default_batch())
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PruneArg {
    Minor,
    Principal,
    Random,
}

#[derive(Args, Clone, Debug)]
struct SearchArgs {
    #[arg(long, value_enum, default_value_t = Order::VisualText)]
    order: Order,
    #[arg(long, value_enum, default_value_t = Objective::LocoopLoss)]
    objective: Objective,
    /// Scorer of the metric objectives (auroc, aupr, fpr).
    #[arg(long, value_enum, default_value_t = Scorer::Mcm)]
    objective_scorer: Scorer,
    /// Candidate ratios (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4"
    )]
    ratios: Vec<f64>,
    #[arg(long, value_enum, default_value_t = WeightType::Up)]
    weight_type: WeightType,
    #[arg(long, value_enum, default_value_t = PruneArg::Minor)]
    prune: PruneArg,
    /// Seed of the `random` prune type.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// LoCoOp λ (default: 0.1, 0.05 for voc).
    #[arg(long)]
    lambda: Option<f64>,
    /// LoCoOp top-K (default: 300 for imagenet1k, 4 for voc, else 30% of the classes).
    #[arg(long)]
    top_k: Option<usize>,
    /// Mark OOD patches with the predicted label instead of the true one.
    #[arg(long)]
    use_pred_label: bool,
    /// Images per loss batch (the reference averages per batch of 512).
    #[arg(long, default_value_t = 512)]
    loss_batch: usize,
    /// Average the loss over the whole set instead of per batch.
    #[arg(long)]
    whole_set: bool,
    /// Also search the projections (W_p) first in each tower.
    #[arg(long)]
    search_proj: bool,
    /// Evaluate each candidate the reference's way (re-run everything): slow, for checking.
    #[arg(long)]
    naive: bool,
}

#[derive(Args, Clone, Debug)]
struct EvalArgs {
    /// Scorers to report (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mcm,gl_mcm")]
    scorers: Vec<Scorer>,
    /// Softmax temperature of the scores (and of the metric objectives).
    #[arg(long, default_value_t = 100.0)]
    temperature: f64,
}

fn parse_ood(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => {
            let p = PathBuf::from(s);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or("expected NAME=DIR")?;
            Ok((name, p))
        }
    }
}

impl SearchArgs {
    fn config(&self, labels: &LabelSet, temperature: f64, batch: usize) -> Result<SearchConfig> {
        let classes = labels.classes.len();
        let (lambda, top_k) = match labels.name.as_str() {
            "imagenet1k" => (0.1, 300),
            "voc" => (0.05, 4),
            _ => (
                0.1,
                ((classes as f64 * 0.3).round() as usize).clamp(1, classes),
            ),
        };
        let top_k = self.top_k.unwrap_or(top_k);
        if top_k == 0 || top_k > classes {
            return Err(Error::invalid(format!(
                "--top-k {top_k} must be between 1 and the {classes} classes"
            )));
        }
        Ok(SearchConfig {
            order: self.order,
            objective: self.objective,
            scorer: self.objective_scorer,
            ratios: self.ratios.clone(),
            weight: self.weight_type,
            prune: match self.prune {
                PruneArg::Minor => PruneType::Minor,
                PruneArg::Principal => PruneType::Principal,
                PruneArg::Random => PruneType::Random { seed: self.seed },
            },
            locoop: LocoopConfig {
                lambda: self.lambda.unwrap_or(lambda),
                top_k,
                use_pred_label: self.use_pred_label,
                averaging: if self.whole_set {
                    Averaging::WholeSet
                } else {
                    Averaging::PerBatch(self.loss_batch)
                },
            },
            temperature,
            recall_level: 0.95,
            freeze_proj: !self.search_proj,
            batch,
            naive: self.naive,
        })
    }
}

/// The checkpoint folder: `--weights`, or openai/clip-vit-base-patch16 through the hub cache.
fn weights_path(arg: &Option<PathBuf>, progress: Progress) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => setar_engine::hub::resolve("openai/clip-vit-base-patch16", progress),
    }
}

/// Everything a job needs of the model.
struct Loaded<B: Backend> {
    file: WeightsFile,
    model: Clip<B>,
    tokenizer: Tokenizer,
}

fn load<B: Backend>(weights: &Path, backend: B) -> Result<Loaded<B>> {
    let (file, config) = open(weights)?;
    let tokenizer = Tokenizer::for_model_dir(file.path().parent())?;
    let model = Clip::load(backend, &file, &config)?;
    Ok(Loaded {
        file,
        model,
        tokenizer,
    })
}

fn run_search<B: Backend>(
    l: &Loaded<B>,
    id_val: &Path,
    labels: &LabelSet,
    cfg: &SearchConfig,
    out: &Path,
    progress: Progress,
) -> Result<SettingsFile> {
    let start = Instant::now();
    // The device's solver loads while the images are read.
    l.model.backend.warm_up_svds();
    let data = jobs::search_data(&l.model, &l.tokenizer, id_val, labels, progress)?;
    let mut cfg = cfg.clone();
    if let Some(budget) = l.model.backend.memory_budget() {
        let batch = setar_engine::search::memory::fit_batch(
            &l.model.config,
            l.file.parameter_count(),
            l.model.backend.value_bytes(),
            data.len(),
            cfg.batch,
            budget,
        )?;
        if batch < cfg.batch && !progress.quiet {
            eprintln!(
                "--batch {} lowered to {batch} to fit --max-memory",
                cfg.batch
            );
        }
        cfg.batch = batch;
    }
    let cfg = &cfg;
    let (state, settings) = jobs::search(&l.model, &l.file, &data, cfg, out, progress)?;
    if !progress.quiet {
        let decided: Vec<String> = settings
            .lora_settings
            .iter()
            .filter(|s| s.ratio > 0.0)
            .map(|s| format!("{} {}", s.target, s.ratio))
            .collect();
        eprintln!(
            "searched {} steps on {} images in {:.1} s: {} = {:.6}; low-rank: {} → {}",
            state.steps.len(),
            data.len(),
            start.elapsed().as_secs_f64(),
            cfg.objective.name(),
            state.best().unwrap_or(f64::NAN),
            if decided.is_empty() {
                "none".into()
            } else {
                decided.join(", ")
            },
            out.join("lora_settings.json").display()
        );
    }
    Ok(settings)
}

#[allow(clippy::too_many_arguments)]
fn run_eval<B: Backend>(
    l: &Loaded<B>,
    settings: Option<(&Path, SettingsFile)>,
    id_test: &Path,
    ood: &[(String, PathBuf)],
    labels: &LabelSet,
    eval: &EvalArgs,
    batch: usize,
    out: &Path,
    progress: Progress,
) -> Result<()> {
    let empty = SettingsFile {
        lora_settings: vec![],
        prune: PruneType::Minor,
        vision_layers: l.model.config.vision.tower.layers,
        text_layers: l.model.config.text.tower.layers,
        vision_width: l.model.config.vision.tower.hidden,
        text_width: l.model.config.text.tower.hidden,
    };
    let settings = match settings {
        Some((path, s)) => {
            s.check_model(path, &l.model)?;
            s
        }
        None => empty,
    };
    let applied = jobs::apply_settings(&l.model, &l.file, &settings)?;
    let result = jobs::evaluate(
        &l.model,
        &l.tokenizer,
        &applied,
        labels,
        id_test,
        ood,
        &eval.scorers,
        eval.temperature,
        0.95,
        batch,
        progress,
    )?;
    let meta = EvalMeta {
        model: l.file.path().display().to_string(),
        labels: labels.name.clone(),
        settings: settings.lora_settings.clone(),
        temperature: eval.temperature,
        backend: l.model.backend.name(),
    };
    report::write_eval(&result, &meta, out)?;
    if !progress.quiet {
        eprintln!("{}", report::markdown(&result, &meta));
        eprintln!("report: {}", out.join("report.md").display());
    }
    Ok(())
}

/// Opens a checkpoint and its sizes (config.json beside it, else inferred).
fn open(weights: &Path) -> Result<(WeightsFile, ClipConfig)> {
    let file = WeightsFile::open(weights)?;
    let config = ClipConfig::for_weights(&file)?;
    Ok((file, config))
}

fn info<B: Backend>(weights: &Path, json: bool, backend: B) -> Result<()> {
    let (file, config) = open(weights)?;
    let model = Clip::load(backend, &file, &config)?;
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
    if let Command::InitRandom {
        preset: name,
        out,
        seed,
    } = &cli.command
    {
        let dtype = match cli.dtype.as_str() {
            "f32" => SaveDtype::F32,
            "f16" => SaveDtype::F16,
            "bf16" => SaveDtype::Bf16,
            other => {
                return Err(Error::invalid(format!(
                    "--dtype {other}: expected f32, f16 or bf16"
                )))
            }
        };
        write_random_model(&preset(name)?, out, *seed, dtype)?;
        if !progress.quiet {
            eprintln!(
                "wrote random {name} ({dtype:?}, seed {seed}) to {}",
                out.display()
            );
        }
        return Ok(());
    }
    let device = cli.device.trim().to_lowercase();
    let max_memory = cli
        .max_memory
        .as_deref()
        .map(setar_engine::search::memory::parse_bytes)
        .transpose()?;
    if device == "cpu" {
        if max_memory.is_some() {
            return Err(Error::invalid(
                "--max-memory caps device memory: it needs --device cuda",
            ));
        }
        if cli.dtype != "f32" {
            return Err(Error::invalid(format!(
                "--dtype {} needs --device cuda: the CPU backend computes in f32",
                cli.dtype
            )));
        }
        return execute(cli.command, || Ok(CpuBackend::new()), progress);
    }
    if !device.starts_with("cuda") {
        return Err(Error::invalid(format!(
            "--device {device}: expected cpu or cuda[:N]"
        )));
    }
    #[cfg(feature = "cuda")]
    {
        use setar_engine::backend::cuda::{ordinal_of, CudaBackend, CudaOptions, DType};
        let ordinal = ordinal_of(&device)?;
        let dtype: DType = cli.dtype.parse()?;
        let opts = CudaOptions {
            max_memory,
            ..CudaOptions::new(dtype)
        };
        execute(
            cli.command,
            move || CudaBackend::with_options(ordinal, opts),
            progress,
        )
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::invalid(format!(
        "--device {device}: this binary was built without CUDA (cargo build --release --features cuda)"
    )))
}

/// Runs a command; `make` builds the compute backend for the commands that load a model.
fn execute<B: Backend>(
    command: Command,
    make: impl FnOnce() -> Result<B>,
    progress: Progress,
) -> Result<()> {
    match command {
        Command::Info { weights, json } => info(&weights, json, make()?),
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
            let model = Clip::load(make()?, &file, &config)?;
            let job = EmbedJob {
                images_dir: &images,
                prompts_file: &prompts,
                out: &out,
                batch: batch.unwrap_or_else(|| model.backend.default_batch()),
                progress,
            };
            let (n, t) = run_embed(&model, &tokenizer, &job)?;
            if !progress.quiet {
                eprintln!(
                    "embedded {n} images and {t} prompts in {:.1} s on {} → {}",
                    start.elapsed().as_secs_f64(),
                    model.backend.name(),
                    out.display()
                );
            }
            Ok(())
        }
        Command::Search {
            model,
            id_val,
            labels,
            search,
            out,
        } => {
            let labels = LabelSet::resolve(&labels)?;
            let l = load(&weights_path(&model.weights, progress)?, make()?)?;
            let batch = model.batch_for(&l.model.backend);
            let cfg = search.config(&labels, 100.0, batch)?;
            run_search(&l, &id_val, &labels, &cfg, &out, progress)?;
            Ok(())
        }
        Command::Eval {
            model,
            settings,
            id_test,
            ood,
            labels,
            eval,
            out,
        } => {
            let labels = LabelSet::resolve(&labels)?;
            let l = load(&weights_path(&model.weights, progress)?, make()?)?;
            let settings = match &settings {
                Some(p) => Some((p.as_path(), SettingsFile::read(p)?)),
                None => None,
            };
            run_eval(
                &l,
                settings,
                &id_test,
                &ood,
                &labels,
                &eval,
                model.batch_for(&l.model.backend),
                &out,
                progress,
            )
        }
        Command::Run {
            model,
            id,
            ood,
            labels,
            search,
            eval,
            out,
        } => {
            let demo = Path::new("demo");
            let (id, ood, labels) = match id {
                Some(id) => (id, ood, labels.unwrap_or_else(|| "imagenet1k".into())),
                None => {
                    if !demo.join("id").is_dir() {
                        return Err(Error::invalid(
                            "no --id given and no demo/ folder here: run from the repository root, or pass --id DIR (with val/ and test/) and --ood NAME=DIR",
                        ));
                    }
                    let ood = if ood.is_empty() {
                        demo_ood(&demo.join("ood"))?
                    } else {
                        ood
                    };
                    let labels =
                        labels.unwrap_or_else(|| demo.join("labels.txt").display().to_string());
                    (demo.join("id"), ood, labels)
                }
            };
            if ood.is_empty() {
                return Err(Error::invalid(
                    "no OOD sets: pass --ood NAME=DIR at least once",
                ));
            }
            let labels = LabelSet::resolve(&labels)?;
            let l = load(&weights_path(&model.weights, progress)?, make()?)?;
            let batch = model.batch_for(&l.model.backend);
            let cfg = search.config(&labels, eval.temperature, batch)?;
            let settings = run_search(
                &l,
                &id.join("val"),
                &labels,
                &cfg,
                &out.join("search"),
                progress,
            )?;
            let path = out.join("search/lora_settings.json");
            run_eval(
                &l,
                Some((&path, settings)),
                &id.join("test"),
                &ood,
                &labels,
                &eval,
                batch,
                &out.join("eval"),
                progress,
            )
        }
        Command::Apply {
            weights,
            settings,
            out,
        } => {
            let l = load(&weights, make()?)?;
            let s = SettingsFile::read(&settings)?;
            s.check_model(&settings, &l.model)?;
            let applied = jobs::apply_settings(&l.model, &l.file, &s)?;
            let file = jobs::write_applied(&l.file, &applied, &l.model.config, &out)?;
            if !progress.quiet {
                eprintln!(
                    "wrote {} ({} low-rank weights)",
                    file.display(),
                    applied.host.len()
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
        // Handled in `run`, before a backend is chosen.
        Command::InitRandom { .. } => Ok(()),
    }
}

/// Every sub-folder of the demo's `ood/` as an OOD set.
fn demo_ood(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            out.push((
                p.file_name()
                    .expect("a folder name")
                    .to_string_lossy()
                    .into_owned(),
                p,
            ));
        }
    }
    out.sort();
    Ok(out)
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
