//! `device_check`: what the device machine runs (scripts/device-check.sh calls it).
//!
//! 1. CUDA vs CPU parity on the parity fixtures (tests/fixtures/models, found from the current
//!    directory) and on a random ViT-B/16 in the real layout, per dtype;
//! 2. the image tower at 224 px, batch B (256), in each dtype: images/s end to end (host
//!    pixels in, host features out) and with the pixel upload timed apart;
//! 3. the Linear GEMM rate of our cuBLASLt path (bf16, 8192³);
//! 4. (`search.rs`) the SVDs and a full SeTAR search (1000 images, 1000 classes, 24 steps × 9
//!    ratios) per `--search-dtypes`, MCM / GL-MCM scoring of 10k images, and the memory check:
//!    CLIP-L/14 search steps under `--max-memory 24G`, and a too-small budget failing cleanly.
//!    Writes the inputs for the PyTorch peer to `--peer-dir`.
//!
//! Writes one JSON object (`--out FILE`, default stdout) and prints a summary to stderr.
//!
//!     device_check --model /tmp/setar-vitb16 --batch 256 --reps 10 --out result.json
//!
//! `--model DIR` is written (random ViT-B/16, seed 0, f32) when it holds no model; the PyTorch
//! peer (scripts/hf_gpu_peer.py) then reads the same checkpoint.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("device_check: built without `--features cuda`; nothing to check");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    // device-pack.sh also copies binaries among the test executables, and run-tests.sh runs
    // each with libtest flags: that is not a request for a device check.
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a.starts_with("--test-threads") || a == "--nocapture" || a == "--list")
    {
        eprintln!("device_check: not a test executable; run it through scripts/device-check.sh");
        return;
    }
    if let Err(e) = check::run() {
        eprintln!("device_check: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod search;

#[cfg(feature = "cuda")]
mod check {
    use serde_json::{json, Value};
    use setar_engine::backend::cpu::CpuBackend;
    use setar_engine::backend::cuda::{
        self, AttentionPath, CudaBackend, CudaOptions, DType, EigPath,
    };
    use setar_engine::backend::{relative_error, Backend, SvdSchedule};
    use setar_engine::config::ClipConfig;
    use setar_engine::model::clip::logits;
    use setar_engine::model::prompts::{BucketPlan, PROMPT_BUCKET};
    use setar_engine::model::random::{preset, write_random_model};
    use setar_engine::model::Clip;
    use setar_engine::search::engine::VisionStates;
    use setar_engine::weights::{SaveDtype, WeightsFile};
    use setar_engine::{Error, Result};
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    struct Args {
        out: Option<PathBuf>,
        model: PathBuf,
        fixtures: PathBuf,
        batch: usize,
        reps: usize,
        dtypes: Vec<String>,
        skip_parity: bool,
        skip_timing: bool,
        skip_search: bool,
        search_images: usize,
        search_chunk: usize,
        /// Searches timed for the first variant (the median is reported).
        search_reps: usize,
        search_dtypes: Vec<String>,
        score_images: usize,
        peer_dir: PathBuf,
        large_model: PathBuf,
    }

    fn parse() -> Result<Args> {
        let mut a = Args {
            out: None,
            model: std::env::temp_dir().join("setar-vitb16"),
            fixtures: PathBuf::from("tests/fixtures/models"),
            batch: 256,
            reps: 10,
            dtypes: ["f32", "bf16", "f16"].map(String::from).to_vec(),
            skip_parity: false,
            skip_timing: false,
            skip_search: false,
            search_images: 1000,
            search_chunk: 250,
            search_reps: 3,
            search_dtypes: vec!["bf16".into()],
            score_images: 10_000,
            peer_dir: std::env::temp_dir().join("setar-search"),
            large_model: std::env::temp_dir().join("setar-vitl14"),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| Error::invalid(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--out" => a.out = Some(value()?.into()),
                "--model" => a.model = value()?.into(),
                "--fixtures" => a.fixtures = value()?.into(),
                "--batch" => a.batch = num(&value()?)?,
                "--reps" => a.reps = num(&value()?)?,
                "--dtypes" => a.dtypes = specs(&value()?)?,
                "--skip-parity" => a.skip_parity = true,
                "--skip-timing" => a.skip_timing = true,
                "--skip-search" => a.skip_search = true,
                "--search-images" => a.search_images = num(&value()?)?,
                "--search-chunk" => a.search_chunk = num(&value()?)?,
                "--search-reps" => a.search_reps = num(&value()?)?.max(1),
                "--score-images" => a.score_images = num(&value()?)?,
                "--peer-dir" => a.peer_dir = value()?.into(),
                "--large-model" => a.large_model = value()?.into(),
                "--search-dtypes" => a.search_dtypes = specs(&value()?)?,
                "-h" | "--help" => {
                    eprintln!(
                        "device_check [--out FILE] [--model DIR] [--fixtures DIR] [--batch 256] [--reps 10] [--dtypes f32,bf16,f16] [--skip-parity] [--skip-timing] [--skip-search] [--search-images 1000] [--search-chunk 250] [--search-reps 3] [--search-dtypes bf16] [--score-images 10000] [--peer-dir DIR] [--large-model DIR]"
                    );
                    std::process::exit(0);
                }
                other => return Err(Error::invalid(format!("unknown argument {other}"))),
            }
        }
        Ok(a)
    }

    /// Backend variants: a dtype, optionally with `+unfused` / `+fused` (the attention path;
    /// by default the fused kernel where it passes its self-check), `+narrow` (the residual
    /// stream in the storage dtype), `+separate` (residual adds by a kernel, not in the
    /// GEMMs), `+devsvd` (the search's SVDs all by cuSOLVER up front: the default), `+hostsvd`
    /// (all on host threads beside the search), `+hybridsvd` (the first by cuSOLVER, the rest
    /// on host threads), `+sidesvd` (the first by cuSOLVER, the rest by cuSOLVER on a second
    /// stream beside the search), `+rowbuckets` (the CPU's text batches of 128 prompts instead of
    /// the device's few large ones), `+eigseq` / `+eigbatched` (how cuSOLVER's
    /// eigen-decompositions run: one after another, or one batched call),
    /// `+deltacand` (search candidates by the shared-product correction, not by their W'),
    /// `+nostack` (a text step's candidates one after another, not stacked in one batch),
    /// `+att8` / `+att4` (the fused attention with 8 warps a block, 128 queries, or 4 and 64:
    /// the default), `+tune` (each GEMM problem's fastest of cuBLASLt's first 8 algorithms,
    /// timed, instead of its heuristic's first), `+sparsestates` / `+everystate` (a search
    /// keeps the vision states of its ⌈√layers⌉ checkpoints only, or of every layer where the
    /// device has room: the default), `+chunk<N>` (search variants only: N images a forward batch instead of
    /// `--search-chunk`; see [`chunk_for`]), e.g. `bf16+unfused`.
    fn options_for(spec: &str) -> Result<CudaOptions> {
        let mut parts = spec.split('+');
        let dtype: DType = parts.next().unwrap_or_default().parse()?;
        let mut o = CudaOptions::new(dtype);
        for flag in parts {
            match flag {
                "fused" => o.attention = AttentionPath::Fused,
                "unfused" => o.attention = AttentionPath::Unfused,
                "narrow" => o.wide_residual = false,
                "separate" => o.fused_residual = false,
                "devsvd" => o.svd = SvdSchedule::UpFront,
                "hostsvd" => o.svd = SvdSchedule::Background,
                "hybridsvd" => o.svd = SvdSchedule::FirstThenBackground,
                "sidesvd" => o.svd = SvdSchedule::SideStream,
                "deltacand" => o.candidate_weights = false,
                "nostack" => o.stack_text = false,
                "att8" => o.attention_warps = 8,
                "att4" => o.attention_warps = 4,
                "tune" => o.gemm_tune = true,
                "sparsestates" | "everystate" => {}
                "eigseq" => o.eig = EigPath::Sequential,
                "eigbatched" => o.eig = EigPath::Batched,
                "rowbuckets" => {
                    o.prompt_buckets = BucketPlan::Fixed {
                        rows: PROMPT_BUCKET,
                    }
                }
                other if chunk_of(other).is_some() => {}
                other => return Err(Error::invalid(format!("{spec}: unknown variant {other}"))),
            }
        }
        Ok(o)
    }

    /// The search's images per forward batch a variant asks for (`+chunk500`), if any.
    fn chunk_for(spec: &str) -> Option<usize> {
        spec.split('+').skip(1).find_map(chunk_of)
    }

    /// The vision states a search variant asks to keep (`+sparsestates`: the checkpoints
    /// only; `+everystate`: every layer), if it asks.
    fn states_for(spec: &str) -> Option<VisionStates> {
        spec.split('+').skip(1).find_map(|f| match f {
            "sparsestates" => Some(VisionStates::Checkpoints),
            "everystate" => Some(VisionStates::EveryLayer),
            _ => None,
        })
    }

    fn chunk_of(flag: &str) -> Option<usize> {
        flag.strip_prefix("chunk")?.parse().ok().filter(|&n| n > 0)
    }

    fn specs(list: &str) -> Result<Vec<String>> {
        let v: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
        for s in &v {
            options_for(s)?;
        }
        Ok(v)
    }

    fn num(s: &str) -> Result<usize> {
        s.parse()
            .map_err(|_| Error::invalid(format!("not a number: {s}")))
    }

    /// Deterministic values in [lo, hi).
    fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// Text inputs: `n` prompts padded to `seq`, each ended by the EOS id (or, when that is
    /// outside the vocabulary, the largest id), other ids below it.
    fn prompts(config: &ClipConfig, n: usize, seq: usize) -> (Vec<u32>, Vec<usize>) {
        let vocab = config.text.vocab_size.max(1) as u32;
        let top = (config.text.eos_token_id as u32).min(vocab - 1);
        let lengths: Vec<usize> = (0..n).map(|i| 2 + (i * 5) % (seq - 1)).collect();
        let ids = lengths
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| {
                (0..seq).map(move |j| {
                    if j + 1 == l {
                        top
                    } else if j >= l || top < 2 {
                        0
                    } else {
                        1 + (i as u32 * 131 + j as u32 * 17) % (top - 1)
                    }
                })
            })
            .collect();
        (ids, lengths)
    }

    /// CUDA (each dtype) vs CPU f32 on one checkpoint: image, local, text embeddings, logits.
    fn parity(dir: &Path, variants: &[String], images: usize, texts: usize) -> Result<Value> {
        let weights = WeightsFile::open(dir)?;
        let config = ClipConfig::for_weights(&weights)?;
        let vc = &config.vision;
        let pixels = values(
            images * vc.channels * vc.image_size * vc.image_size,
            7,
            -2.0,
            2.0,
        );
        let seq = 12.min(config.text.context_length);
        let (ids, lengths) = prompts(&config, texts, seq);
        let t = Instant::now();
        let cpu = Clip::load(CpuBackend::new(), &weights, &config)?;
        let ci = cpu.encode_images(&pixels, images, true)?;
        let ct = cpu.encode_text(&ids, &lengths, seq)?;
        let cpu_s = t.elapsed().as_secs_f64();
        let p = config.projection_dim;
        let cl = logits(&ci.embeds, &ct, p, cpu.logit_scale);
        let mut out = serde_json::Map::new();
        for spec in variants {
            let gpu = Clip::load(
                CudaBackend::with_options(0, options_for(spec)?)?,
                &weights,
                &config,
            )?;
            let gi = gpu.encode_images(&pixels, images, true)?;
            let gt = gpu.encode_text(&ids, &lengths, seq)?;
            let gl = logits(&gi.embeds, &gt, p, gpu.logit_scale);
            let errs = json!({
                "image_embeds": relative_error(&gi.embeds, &ci.embeds),
                "image_local_embeds": relative_error(gi.local.as_deref().unwrap_or(&[]), ci.local.as_deref().unwrap_or(&[])),
                "text_embeds": relative_error(&gt, &ct),
                "logits": relative_error(&gl, &cl),
            });
            eprintln!("  {:<24} {spec:>10}: {errs}", dir.display());
            out.insert(spec.clone(), errs);
        }
        out.insert("cpu_seconds".into(), json!(cpu_s));
        out.insert("images".into(), json!(images));
        out.insert("prompts".into(), json!(texts));
        Ok(Value::Object(out))
    }

    /// Multiply-adds ×2 of one image through the tower, global features only, as we compute
    /// it: patch embedding, L−1 full blocks, the last block's class-token path, projection.
    fn image_gflop(c: &ClipConfig) -> f64 {
        let v = &c.vision;
        let (d, i, t) = (
            v.tower.hidden as f64,
            v.tower.intermediate as f64,
            v.tokens() as f64,
        );
        let patches = (v.grid() * v.grid()) as f64;
        let patch = 2.0 * patches * d * (v.channels * v.patch_size * v.patch_size) as f64;
        let block = 2.0 * t * (4.0 * d * d + 2.0 * d * i) + 2.0 * 2.0 * t * t * d;
        let last = 2.0 * t * 2.0 * d * d // k, v
            + 2.0 * (2.0 * d * d + 2.0 * d * i) // q, o, fc1, fc2 on the class token
            + 2.0 * 2.0 * t * d; // one query's attention
        let proj = 2.0 * d * c.projection_dim as f64;
        (patch + (v.tower.layers as f64 - 1.0) * block + last + proj) / 1e9
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn timing(dir: &Path, spec: &str, batch: usize, reps: usize) -> Result<Value> {
        let weights = WeightsFile::open(dir)?;
        let config = ClipConfig::for_weights(&weights)?;
        let t = Instant::now();
        let base = options_for(spec)?;
        let dtype = spec;
        let model = Clip::load(CudaBackend::with_options(0, base)?, &weights, &config)?;
        let load_s = t.elapsed().as_secs_f64();
        let vc = &config.vision;
        let pixels = values(
            batch * vc.channels * vc.image_size * vc.image_size,
            11,
            -2.0,
            2.0,
        );
        let run = |local: bool| -> Result<f64> {
            let t = Instant::now();
            let f = model.encode_images(&pixels, batch, local)?;
            if f.embeds.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "{dtype}: non-finite image features"
                )));
            }
            Ok(t.elapsed().as_secs_f64())
        };
        for _ in 0..2 {
            run(false)?;
        }
        let total: Vec<f64> = (0..reps).map(|_| run(false)).collect::<Result<_>>()?;
        let local: Vec<f64> = (0..reps.div_ceil(2))
            .map(|_| run(true))
            .collect::<Result<_>>()?;
        // The host → device pixel upload (rounded to the storage dtype), timed on its own.
        let b = &model.backend;
        let upload: Vec<f64> = (0..reps)
            .map(|_| -> Result<f64> {
                let t = Instant::now();
                let px = b.tensor_from(&pixels)?;
                b.synchronize()?;
                drop(px);
                Ok(t.elapsed().as_secs_f64())
            })
            .collect::<Result<_>>()?;
        // Pixels already on the device, features left there: the tower alone.
        let px = b.tensor_from(&pixels)?;
        let none = setar_engine::model::overrides::Overrides::none();
        let layers = config.vision.tower.layers;
        let resident = || -> Result<f64> {
            b.synchronize()?;
            let t = Instant::now();
            let mut h = model.vision_embed_tensor(&px, batch)?;
            model.vision_layers(&mut h, batch, 0..layers - 1, &none)?;
            let f = model.vision_head_tensors(h, batch, false, &none)?;
            b.synchronize()?;
            drop(f);
            Ok(t.elapsed().as_secs_f64())
        };
        resident()?;
        let on_device_s: Vec<f64> = (0..reps).map(|_| resident()).collect::<Result<_>>()?;
        let (tm, lm) = (median(total.clone()), median(local.clone()));
        let gflop = image_gflop(&config);
        let on_device = batch as f64 / median(on_device_s.clone());
        // Where the time goes: one batch with every op timed (synchronised around each op,
        // so the total exceeds the free-running time; the shares are what count).
        let profile = {
            let opts = CudaOptions {
                profile: true,
                ..base
            };
            let pm = Clip::load(CudaBackend::with_options(0, opts)?, &weights, &config)?;
            pm.encode_images(&pixels, batch, false)?;
            pm.backend.reset_profile();
            pm.encode_images(&pixels, batch, false)?;
            let p = pm.backend.profile();
            let total: f64 = p.iter().map(|x| x.1).sum();
            let line: Vec<String> = p
                .iter()
                .map(|(op, s, _)| format!("{op} {:.0}%", 100.0 * s / total))
                .collect();
            eprintln!(
                "  {dtype:>4} profile ({:.1} ms synchronised): {}",
                total * 1e3,
                line.join(", ")
            );
            json!(p
                .iter()
                .map(|(op, s, n)| json!({"op": op, "ms": s * 1e3, "calls": n}))
                .collect::<Vec<_>>())
        };
        let res = json!({
            "profile": profile,
            "gemm_tuning": tuning_summary(b),
            "backend": b.name(),
            "attention_note": b.attention_note(),
            "batch": batch,
            "load_seconds": load_s,
            "seconds": total,
            "upload_seconds": upload,
            "device_resident_seconds": on_device_s,
            "local_seconds": local,
            "img_per_s": batch as f64 / tm,
            "img_per_s_device_resident": on_device,
            "img_per_s_with_local": batch as f64 / lm,
            "gflop_per_image": gflop,
            "tflops_device_resident": on_device * gflop / 1e3,
        });
        eprintln!(
            "  {dtype:>4} batch {batch}: {:.0} img/s end to end, {:.0} img/s without the upload ({:.1} TFLOP/s), {:.0} img/s with local features",
            batch as f64 / tm,
            on_device,
            on_device * gflop / 1e3,
            batch as f64 / lm
        );
        Ok(res)
    }

    /// The shared libraries this process loaded from CUDA (which copies were found).
    fn loaded_libraries() -> Vec<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let mut libs: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| {
                ["libcuda", "libcublas", "libnvrtc"]
                    .iter()
                    .any(|n| p.contains(n))
            })
            .map(String::from)
            .collect();
        libs.sort();
        libs.dedup();
        libs
    }

    /// Writes what `report` holds so far to `--out` (after each section, so a check stopped
    /// by its timeout still leaves what it measured); without `--out`, nothing until the end.
    fn save_partial(args: &Args, report: &serde_json::Map<String, Value>) {
        if let Some(p) = &args.out {
            let text = serde_json::to_string_pretty(report).unwrap_or_default();
            if let Err(e) = std::fs::write(p, text) {
                eprintln!("  could not write {}: {e}", p.display());
            }
        }
    }

    pub fn run() -> Result<()> {
        let args = parse()?;
        let t0 = Instant::now();
        let mut report = serde_json::Map::new();
        // First, as it needs no GPU: the PyTorch peer reads this checkpoint even if we fail.
        if !args.model.join("model.safetensors").is_file() {
            eprintln!("writing a random ViT-B/16 to {}", args.model.display());
            let t = Instant::now();
            write_random_model(&preset("vit-b-16")?, &args.model, 0, SaveDtype::F32)?;
            eprintln!("  {:.1} s", t.elapsed().as_secs_f64());
        }
        let devices = cuda::devices()?;
        eprintln!("devices: {devices:?}");
        report.insert("devices".into(), json!(devices));
        report.insert(
            "nvrtc".into(),
            json!(cuda::kernels::nvrtc_version()
                .ok()
                .map(|(a, b)| format!("{a}.{b}"))),
        );
        report.insert(
            "prebuilt_kernels".into(),
            json!(cuda::kernels::has_prebuilt()),
        );

        if !args.skip_parity {
            eprintln!("parity, CUDA vs CPU f32 (‖Δ‖/‖ref‖):");
            let mut parity = serde_json::Map::new();
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&args.fixtures)
                .map_err(|e| Error::io(&args.fixtures, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("model.safetensors").is_file())
                .collect();
            dirs.sort();
            for dir in dirs {
                let name = dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                parity.insert(name, parity_or_error(&dir, &args.dtypes, 3, 4));
            }
            parity.insert(
                "vit-b-16-random".into(),
                parity_or_error(&args.model, &args.dtypes, 2, 3),
            );
            report.insert("parity".into(), Value::Object(parity));
            save_partial(&args, &report);
        }

        if !args.skip_timing {
            eprintln!("image tower, global features:");
            let mut tower = serde_json::Map::new();
            for spec in &args.dtypes {
                let r = timing(&args.model, spec, args.batch, args.reps)
                    .unwrap_or_else(|e| json!({ "error": e.to_string() }));
                tower.insert(spec.clone(), r);
            }
            report.insert("image_tower".into(), Value::Object(tower));
            let gemm = CudaBackend::new(0, DType::BF16)
                .and_then(|b| b.bench_gemm(8192, 8192, 8192, 10))
                .map_or_else(|e| json!({ "error": e.to_string() }), |t| json!(t));
            eprintln!("our bf16 GEMM 8192³ (cuBLASLt path): {gemm} TFLOP/s");
            report.insert("gemm_bf16_8192_tflops".into(), gemm);
            save_partial(&args, &report);
        }
        if !args.skip_search {
            if let Err(e) = search_section(&args, &mut report) {
                eprintln!("  search: ERROR {e}");
                // Beside the variants already in, which the summary still reads.
                let search = report.entry("search").or_insert_with(|| json!({}));
                if let Some(m) = search.as_object_mut() {
                    m.insert("error".into(), json!(e.to_string()));
                }
            }
            save_partial(&args, &report);
            let r = memory_section(&args).unwrap_or_else(|e| {
                eprintln!("  memory: ERROR {e}");
                json!({ "error": e.to_string() })
            });
            report.insert("memory".into(), r);
        }
        report.insert("libraries".into(), json!(loaded_libraries()));
        report.insert("seconds".into(), json!(t0.elapsed().as_secs_f64()));
        let text = serde_json::to_string_pretty(&Value::Object(report))
            .map_err(|e| Error::invalid(e.to_string()))?;
        match &args.out {
            Some(p) => std::fs::write(p, text).map_err(|e| Error::io(p, e))?,
            None => println!("{text}"),
        }
        Ok(())
    }

    /// Per dtype: the SVDs and the whole search, then scoring; the peer's inputs once. Each
    /// variant's results go into `report["search"]` (and to `--out`) as soon as they are in.
    fn search_section(args: &Args, report: &mut serde_json::Map<String, Value>) -> Result<()> {
        eprintln!("search (random ViT-B/16, synthetic data):");
        let weights = WeightsFile::open(&args.model)?;
        let config = ClipConfig::for_weights(&weights)?;
        let mut out = serde_json::Map::new();
        let mut peer_written = false;
        for spec in &args.search_dtypes {
            let model = Clip::load(
                CudaBackend::with_options(0, options_for(spec)?)?,
                &weights,
                &config,
            )?;
            // As the CLI does before it reads the images.
            model.backend.warm_up_svds();
            let data = super::search::synthetic_data(&model, args.search_images, 1000, values)?;
            let cfg = super::search::config(chunk_for(spec).unwrap_or(args.search_chunk));
            if !peer_written {
                super::search::write_peer_data(&args.peer_dir, &model, &data, &cfg)?;
                peer_written = true;
            }
            let mut r = serde_json::Map::new();
            // The first variant is timed `search_reps` times (the first pays what a process's
            // first search pays); the run with the median time stands for it.
            let reps = if out.is_empty() { args.search_reps } else { 1 };
            let timed = (0..reps)
                .map(|_| {
                    super::search::time_search(&model, &weights, &data, &cfg, states_for(spec))
                })
                .collect::<Result<Vec<Value>>>()
                .map(|runs| {
                    let seconds: Vec<f64> = runs
                        .iter()
                        .map(|v| v["seconds"].as_f64().unwrap_or(0.0))
                        .collect();
                    let svd: Vec<f64> = runs
                        .iter()
                        .map(|v| v["svd_seconds"].as_f64().unwrap_or(0.0))
                        .collect();
                    let mut order: Vec<usize> = (0..runs.len()).collect();
                    order.sort_by(|&a, &b| seconds[a].total_cmp(&seconds[b]));
                    let mut median = runs[order[runs.len() / 2]].clone();
                    median["seconds_each"] = json!(seconds);
                    median["svd_seconds_each"] = json!(svd);
                    median
                });
            r.insert(
                "search".into(),
                timed.unwrap_or_else(|e| json!({ "error": e.to_string() })),
            );
            r.insert("gemm_tuning".into(), tuning_summary(&model.backend));
            r.insert(
                "scoring".into(),
                super::search::time_scoring(&model, &data, args.score_images, 500)
                    .unwrap_or_else(|e| json!({ "error": e.to_string() })),
            );
            // Once, with the last variant (a fault in a new eigen path loses the least): the
            // SVDs by each eigen path.
            if args.search_dtypes.last() == Some(spec) {
                r.insert(
                    "svd_paths".into(),
                    super::search::time_svd_paths(&model, &weights, &cfg)
                        .unwrap_or_else(|e| json!({ "error": e.to_string() })),
                );
            }
            drop(model);
            // Once, for the first variant: where a vision and a text step spend their time.
            if out.is_empty() {
                let opts = CudaOptions {
                    profile: true,
                    ..options_for(spec)?
                };
                let profiled = Clip::load(CudaBackend::with_options(0, opts)?, &weights, &config)
                    .and_then(|m| super::search::profile_steps(&m, &weights, &data, &cfg));
                r.insert(
                    "step_profile".into(),
                    profiled.unwrap_or_else(|e| json!({ "error": e.to_string() })),
                );
            }
            out.insert(spec.clone(), Value::Object(r));
            report.insert("search".into(), Value::Object(out.clone()));
            save_partial(args, report);
        }
        Ok(())
    }

    /// CLIP-L/14 (random, real layout) under a 24 GiB budget: the chunk size `fit_batch`
    /// picks, then the first vision step and the first text step of a 1000-image search (the
    /// text step builds the cached image features); peak memory. Then a 2 GiB budget with the
    /// chunk forced to 256: an out-of-memory error, and the backend still works.
    fn memory_section(args: &Args) -> Result<Value> {
        use setar_engine::lowrank::{rank_for, Target, Tower, WeightType};
        use setar_engine::search::engine::Engine;
        use setar_engine::search::memory::fit_batch;
        eprintln!("memory (random CLIP-L/14, --max-memory 24G):");
        if !args.large_model.join("model.safetensors").is_file() {
            write_random_model(&preset("vit-l-14")?, &args.large_model, 0, SaveDtype::Bf16)?;
        }
        let weights = WeightsFile::open(&args.large_model)?;
        let config = ClipConfig::for_weights(&weights)?;
        let run = |budget: usize, chunk: Option<usize>| -> Result<Value> {
            let opts = CudaOptions {
                max_memory: Some(budget),
                ..CudaOptions::new(DType::BF16)
            };
            let model = Clip::load(CudaBackend::with_options(0, opts)?, &weights, &config)?;
            let data = super::search::synthetic_data(&model, args.search_images, 1000, values)?;
            let batch = match chunk {
                Some(c) => c,
                None => fit_batch(
                    &config,
                    weights.parameter_count(),
                    2,
                    data.len(),
                    512,
                    budget,
                )?,
            };
            let cfg = super::search::config(batch);
            let t = Instant::now();
            let mut engine = Engine::new(&model, &weights, &data, &cfg);
            let bar = indicatif::ProgressBar::hidden();
            let mut values_at = Vec::new();
            for target in [
                Target {
                    tower: Tower::Visual,
                    weight: WeightType::Up,
                    layer: Some(config.vision.tower.layers - 1),
                },
                Target {
                    tower: Tower::Text,
                    weight: WeightType::Up,
                    layer: Some(config.text.tower.layers - 1),
                },
            ] {
                let k = engine.prepare(target)?.k();
                let ranks: Vec<usize> = cfg
                    .ratios
                    .iter()
                    .map(|&r| rank_for(k, r, &target))
                    .collect::<Result<_>>()?;
                let outcomes = engine.evaluate(target, &ranks, &bar)?;
                values_at.push(outcomes.iter().map(|o| o.value).collect::<Vec<_>>());
                engine.decide(target, ranks[ranks.len() / 2])?;
            }
            model.backend.synchronize()?;
            Ok(json!({
                "budget_bytes": budget,
                "chunk": batch,
                "seconds": t.elapsed().as_secs_f64(),
                "peak_device_memory_bytes": model.backend.peak_memory(),
                "values": values_at,
            }))
        };
        let fits = run(24 << 30, None)?;
        eprintln!("  24 GiB budget: {fits}");
        let tight = match run(2 << 30, Some(256)) {
            Ok(v) => json!({ "unexpected_success": v }),
            Err(e) => json!({ "error_reported": e.to_string() }),
        };
        eprintln!("  2 GiB budget, chunk 256: {tight}");
        let after =
            CudaBackend::new(0, DType::BF16).and_then(|b| b.bench_gemm(1024, 1024, 1024, 2));
        Ok(json!({
            "clip_l14_24GiB": fits,
            "clip_l14_2GiB_chunk256": tight,
            "device_usable_after": after.is_ok(),
        }))
    }

    /// With `+tune`: per problem tuned, the heuristic's first algorithm against the one kept
    /// (µs per run), and the sum over problems; null without tuning.
    pub fn tuning_summary(b: &CudaBackend) -> Value {
        let records = b.gemm_tune_records();
        if records.is_empty() {
            return Value::Null;
        }
        let (mut first, mut kept) = (0.0, 0.0);
        let problems: Vec<Value> = records
            .iter()
            .map(|r| {
                let f = r.micros.first().copied().flatten().unwrap_or(f64::NAN);
                let k = r.micros[r.chosen].unwrap_or(f64::NAN);
                first += f;
                kept += k;
                json!({
                    "mnk": [r.m, r.n, r.k], "dtype": r.dtype, "out": r.out, "beta": r.beta,
                    "first_us": f, "kept_us": k, "chosen": r.chosen, "micros": r.micros,
                })
            })
            .collect();
        json!({
            "problems": records.len(),
            "changed": records.iter().filter(|r| r.chosen != 0).count(),
            "first_us_sum": first,
            "kept_us_sum": kept,
            "each": problems,
        })
    }

    fn parity_or_error(dir: &Path, dtypes: &[String], images: usize, texts: usize) -> Value {
        parity(dir, dtypes, images, texts).unwrap_or_else(|e| {
            eprintln!("  {}: ERROR {e}", dir.display());
            json!({ "error": e.to_string() })
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn variants_parse() {
            let o = options_for("bf16+narrow+chunk1000+att8").unwrap();
            assert!(!o.wide_residual);
            assert_eq!(o.attention_warps, 8);
            assert_eq!(chunk_for("bf16+narrow+chunk1000+att8"), Some(1000));
            assert_eq!(chunk_for("bf16+narrow"), None);
            assert_eq!(
                states_for("bf16+sparsestates+chunk500"),
                Some(VisionStates::Checkpoints)
            );
            assert_eq!(states_for("bf16+narrow"), None);
            assert!(options_for("bf16+chunk0").is_err());
            assert!(options_for("bf16+chunky").is_err());
        }
    }
}
