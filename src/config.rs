//! Model sizes: from `config.json` beside the weights (HF `CLIPConfig`), else inferred from the
//! tensor shapes (CLIP uses 64-dim heads). Either way they are checked against the tensors.

use crate::error::{Error, Result};
use crate::weights::WeightsFile;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The MLP nonlinearity, as HF's `hidden_act` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// x·sigmoid(1.702x), OpenAI CLIP's choice.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The exact erf GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Activation> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// What the vision and text transformers share.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f32,
    pub act: Activation,
}

impl TowerConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
}

impl VisionConfig {
    /// Patches per side (14 for ViT-B/16 at 224 px).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per image: the class token plus one per patch.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub tower: TowerConfig,
    pub vocab_size: usize,
    pub context_length: usize,
    /// HF pools at the first `eos_token_id`, except legacy configs with id 2 (argmax of ids).
    pub eos_token_id: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub projection_dim: usize,
    /// Where the sizes came from: the config file's path, or "tensor shapes".
    pub source: String,
}

const DEFAULT_EPS: f32 = 1e-5;
const HEAD_DIM: usize = 64;

// HF `CLIPConfig` JSON, with HF's defaults for omitted fields.
#[derive(Deserialize)]
struct HfClipConfig {
    text_config: Option<serde_json::Value>,
    vision_config: Option<serde_json::Value>,
    /// Older configs (e.g. openai/clip-vit-base-patch16) also carry `*_config_dict`, which HF
    /// lets override `*_config`.
    text_config_dict: Option<serde_json::Value>,
    vision_config_dict: Option<serde_json::Value>,
    projection_dim: Option<usize>,
}

fn merged(base: Option<serde_json::Value>, over: Option<serde_json::Value>) -> serde_json::Value {
    let mut out = match base {
        Some(serde_json::Value::Object(m)) => m,
        _ => Default::default(),
    };
    if let Some(serde_json::Value::Object(m)) = over {
        out.extend(m);
    }
    serde_json::Value::Object(out)
}

fn field<T: serde::de::DeserializeOwned>(
    path: &Path,
    obj: &serde_json::Value,
    section: &str,
    key: &str,
    default: T,
) -> Result<T> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::file(path, format!("{section}.{key}: {e}"))),
    }
}

fn tower_from_json(
    path: &Path,
    obj: &serde_json::Value,
    section: &str,
    defaults: (usize, usize, usize, usize),
) -> Result<TowerConfig> {
    let act_name: String = field(path, obj, section, "hidden_act", "quick_gelu".to_string())?;
    let act = Activation::from_hf(&act_name).ok_or_else(|| {
        Error::file(
            path,
            format!(
                "{section}.hidden_act \"{act_name}\" is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"
            ),
        )
    })?;
    let tower = TowerConfig {
        hidden: field(path, obj, section, "hidden_size", defaults.0)?,
        intermediate: field(path, obj, section, "intermediate_size", defaults.1)?,
        heads: field(path, obj, section, "num_attention_heads", defaults.2)?,
        layers: field(path, obj, section, "num_hidden_layers", defaults.3)?,
        eps: field::<f64>(path, obj, section, "layer_norm_eps", DEFAULT_EPS as f64)? as f32,
        act,
    };
    if tower.heads == 0 || tower.hidden % tower.heads != 0 {
        return Err(Error::file(
            path,
            format!(
                "{section}: hidden_size {} is not divisible by num_attention_heads {}",
                tower.hidden, tower.heads
            ),
        ));
    }
    Ok(tower)
}

impl ClipConfig {
    /// Reads an HF `config.json` (a `CLIPConfig`).
    pub fn from_json_file(path: &Path) -> Result<ClipConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let hf: HfClipConfig = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a CLIP config.json: {e}")))?;
        let t = merged(hf.text_config, hf.text_config_dict);
        let v = merged(hf.vision_config, hf.vision_config_dict);
        // HF CLIPTextConfig / CLIPVisionConfig defaults.
        let text = TextConfig {
            tower: tower_from_json(path, &t, "text_config", (512, 2048, 8, 12))?,
            vocab_size: field(path, &t, "text_config", "vocab_size", 49408)?,
            context_length: field(path, &t, "text_config", "max_position_embeddings", 77)?,
            eos_token_id: field(path, &t, "text_config", "eos_token_id", 49407)?,
        };
        let vision = VisionConfig {
            tower: tower_from_json(path, &v, "vision_config", (768, 3072, 12, 12))?,
            image_size: field(path, &v, "vision_config", "image_size", 224)?,
            patch_size: field(path, &v, "vision_config", "patch_size", 32)?,
            channels: field(path, &v, "vision_config", "num_channels", 3)?,
        };
        if vision.patch_size == 0 || vision.image_size % vision.patch_size != 0 {
            return Err(Error::file(
                path,
                format!(
                    "vision_config: image_size {} is not a multiple of patch_size {}",
                    vision.image_size, vision.patch_size
                ),
            ));
        }
        Ok(ClipConfig {
            vision,
            text,
            projection_dim: hf.projection_dim.unwrap_or(512),
            source: path.display().to_string(),
        })
    }

    /// Infers every size from the tensor shapes (64-dim heads, quick_gelu, eps 1e-5).
    pub fn infer(w: &WeightsFile) -> Result<ClipConfig> {
        let path = w.path();
        let dim = |name: &str, axis: usize| -> Result<usize> {
            let shape = w.shape(name)?;
            shape.get(axis).copied().ok_or_else(|| {
                Error::tensor(path, name, format!("shape {shape:?} has no axis {axis}"))
            })
        };
        let heads_of = |name: &str, hidden: usize| -> Result<usize> {
            if hidden % HEAD_DIM != 0 {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "width {hidden} is not a multiple of 64, so the head count cannot be inferred: put a config.json beside the weights"
                    ),
                ));
            }
            Ok(hidden / HEAD_DIM)
        };
        let layers_of = |prefix: &str| -> usize {
            let mut n = 0;
            while w
                .tensors()
                .contains_key(&format!("{prefix}.encoder.layers.{n}.mlp.fc1.weight"))
            {
                n += 1;
            }
            n
        };

        let v_hidden = dim("vision_model.embeddings.class_embedding", 0)?;
        let patch_name = "vision_model.embeddings.patch_embedding.weight";
        let patch_size = dim(patch_name, 2)?;
        let v_pos = dim("vision_model.embeddings.position_embedding.weight", 0)?;
        let grid = ((v_pos.saturating_sub(1)) as f64).sqrt().round() as usize;
        if grid * grid + 1 != v_pos {
            return Err(Error::tensor(
                path,
                "vision_model.embeddings.position_embedding.weight",
                format!("{v_pos} positions is not 1 + a square number of patches"),
            ));
        }
        let vision = VisionConfig {
            tower: TowerConfig {
                hidden: v_hidden,
                intermediate: dim("vision_model.encoder.layers.0.mlp.fc1.weight", 0)?,
                heads: heads_of("vision_model.embeddings.class_embedding", v_hidden)?,
                layers: layers_of("vision_model"),
                eps: DEFAULT_EPS,
                act: Activation::QuickGelu,
            },
            image_size: grid * patch_size,
            patch_size,
            channels: dim(patch_name, 1)?,
        };
        let tok = "text_model.embeddings.token_embedding.weight";
        let t_hidden = dim(tok, 1)?;
        let vocab_size = dim(tok, 0)?;
        let text = TextConfig {
            tower: TowerConfig {
                hidden: t_hidden,
                intermediate: dim("text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
                heads: heads_of(tok, t_hidden)?,
                layers: layers_of("text_model"),
                eps: DEFAULT_EPS,
                act: Activation::QuickGelu,
            },
            vocab_size,
            context_length: dim("text_model.embeddings.position_embedding.weight", 0)?,
            eos_token_id: vocab_size - 1,
        };
        Ok(ClipConfig {
            vision,
            text,
            projection_dim: dim("visual_projection.weight", 0)?,
            source: "tensor shapes".into(),
        })
    }

    /// `config.json` beside the weights file when there is one, else inferred from shapes.
    pub fn for_weights(w: &WeightsFile) -> Result<ClipConfig> {
        let beside = w.path().parent().map(|d| d.join("config.json"));
        match beside {
            Some(p) if p.is_file() => ClipConfig::from_json_file(&p),
            _ => ClipConfig::infer(w),
        }
    }

    /// An HF-loadable `config.json` for these sizes (used by `init-random` and `apply`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let t = &self.text;
        let v = &self.vision;
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": 2.6592,
            "initializer_factor": 1.0,
            "text_config": {
                "model_type": "clip_text_model",
                "hidden_size": t.tower.hidden,
                "intermediate_size": t.tower.intermediate,
                "num_attention_heads": t.tower.heads,
                "num_hidden_layers": t.tower.layers,
                "layer_norm_eps": t.tower.eps,
                "hidden_act": t.tower.act.hf_name(),
                "vocab_size": t.vocab_size,
                "max_position_embeddings": t.context_length,
                "projection_dim": self.projection_dim,
                "bos_token_id": 49406,
                "eos_token_id": t.eos_token_id,
                "pad_token_id": 1,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.tower.hidden,
                "intermediate_size": v.tower.intermediate,
                "num_attention_heads": v.tower.heads,
                "num_hidden_layers": v.tower.layers,
                "layer_norm_eps": v.tower.eps,
                "hidden_act": v.tower.act.hf_name(),
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.channels,
                "projection_dim": self.projection_dim,
            },
        })
    }
}
