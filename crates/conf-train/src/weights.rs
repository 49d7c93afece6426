//! A trained model outside its run: the model card every run writes beside its checkpoints,
//! loading a model from a run, a checkpoint or an exported file, and the SafeTensors export
//! with PyTorch's names and layouts (docs/models.md) that `bench/reference.py` loads too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{
    ApplyResult, BurnToPyTorchAdapter, BurnpackStore, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use conf_data::{TokenizerSpec, write_atomic};
use conf_model::{ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig, MiniGpt, Precision};
use serde::{Deserialize, Serialize};

use crate::lookahead::ConfInput;
use crate::objective::ObjectiveKind;

/// The card's file in a run directory, beside `checkpoints/`.
pub const CARD_FILE: &str = "model.json";
/// The metadata keys of an export: each a JSON value.
const META_ARCHITECTURE: &str = "lookahead.architecture";
const META_OBJECTIVE: &str = "lookahead.objective";
const META_CONF_INPUT: &str = "lookahead.conf_input";
const META_TOKENIZER: &str = "lookahead.tokenizer";
const META_STEP: &str = "lookahead.step";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// The weights do not fit what they are loaded into.
    #[error("{path}: {message}")]
    Mismatch { path: PathBuf, message: String },
}

fn file_error(path: &Path, message: impl ToString) -> WeightsError {
    WeightsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Which model, with every number that shapes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", content = "config", rename_all = "lowercase")]
pub enum Architecture {
    Standard(GptConfig),
    Confidence(ConfidenceGptConfig),
}

impl Architecture {
    /// The model `objective` trains: the parameter-matched MiniGPT for `standard`, `model`
    /// for the confidence objectives.
    pub fn of(objective: ObjectiveKind, model: &ConfidenceGptConfig) -> Self {
        match objective {
            ObjectiveKind::Standard => Self::Standard(model.matched_standard().standard),
            ObjectiveKind::Seed | ObjectiveKind::Dense | ObjectiveKind::Teacher => {
                Self::Confidence(model.clone())
            }
        }
    }

    /// The first number in which `other` builds a different function than `self` (dropout
    /// and the confidence head's initial bias aside, which loaded weights do not depend on).
    pub fn difference(&self, other: &Self) -> Option<String> {
        if self.name() != other.name() {
            return Some(format!(
                "model {} here, {} there",
                self.name(),
                other.name()
            ));
        }
        let (a, b) = (self.gpt(), other.gpt());
        let fields = [
            ("vocab_size", a.vocab_size, b.vocab_size),
            (
                "context_length (seq_len)",
                a.context_length,
                b.context_length,
            ),
            ("d_model", a.d_model, b.d_model),
            ("n_layers", a.n_layers, b.n_layers),
            ("n_heads", a.n_heads, b.n_heads),
            ("mlp_hidden", a.mlp_hidden, b.mlp_hidden),
        ];
        if let Some((name, here, there)) = fields.iter().find(|(_, x, y)| x != y) {
            return Some(format!("{name} {here} here, {there} there"));
        }
        match (self, other) {
            (Self::Confidence(x), Self::Confidence(y)) if x.conf_head != y.conf_head => Some(
                format!("conf_head {:?} here, {:?} there", x.conf_head, y.conf_head),
            ),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Standard(_) => "standard",
            Self::Confidence(_) => "confidence",
        }
    }

    pub fn gpt(&self) -> &GptConfig {
        match self {
            Self::Standard(gpt) => gpt,
            Self::Confidence(config) => &config.gpt,
        }
    }
}

/// What a set of weights needs to be used: the model, how it was trained and its tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub architecture: Architecture,
    pub objective: ObjectiveKind,
    /// The confidence model's input in training, which sampling reproduces.
    pub conf_input: ConfInput,
    pub tokenizer: TokenizerSpec,
}

impl ModelCard {
    /// Writes the card into `run_dir` (atomically).
    pub fn save(&self, run_dir: &Path) -> Result<(), WeightsError> {
        let path = run_dir.join(CARD_FILE);
        let json = serde_json::to_vec_pretty(self).expect("a card serialises");
        write_atomic(&path, &json).map_err(|e| file_error(&path, e))
    }

    pub fn load(run_dir: &Path) -> Result<Self, WeightsError> {
        let path = run_dir.join(CARD_FILE);
        let text = std::fs::read(&path).map_err(|e| file_error(&path, e))?;
        serde_json::from_slice(&text).map_err(|e| file_error(&path, e))
    }
}

/// One of the two models, built on some device.
#[derive(Debug, Clone)]
pub enum AnyModel {
    Standard(MiniGpt),
    Confidence(ConfidenceAwareGpt),
}

impl AnyModel {
    /// A freshly initialised model of `architecture`.
    pub fn init(architecture: &Architecture, device: &Device) -> Self {
        match architecture {
            Architecture::Standard(gpt) => Self::Standard(gpt.init_minigpt(device)),
            Architecture::Confidence(config) => Self::Confidence(config.init(device)),
        }
    }

    /// The same model with its matrix products in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        match self {
            Self::Standard(m) => Self::Standard(m.with_precision(precision)),
            Self::Confidence(m) => Self::Confidence(m.with_precision(precision)),
        }
    }

    fn load_from<S: ModuleStore>(&mut self, store: &mut S) -> Result<ApplyResult, S::Error> {
        match self {
            Self::Standard(m) => m.load_from(store),
            Self::Confidence(m) => m.load_from(store),
        }
    }

    fn save_into<S: ModuleStore>(&self, store: &mut S) -> Result<(), S::Error> {
        match self {
            Self::Standard(m) => m.save_into(store),
            Self::Confidence(m) => m.save_into(store),
        }
    }
}

/// A model with its card, and where it came from.
#[derive(Debug, Clone)]
pub struct TrainedModel {
    pub card: ModelCard,
    pub model: AnyModel,
    /// Optimizer steps behind these weights, when known.
    pub step: Option<usize>,
    /// The checkpoint set or file the weights were read from.
    pub source: PathBuf,
    /// The run that wrote the checkpoint (none for an export).
    pub run_dir: Option<PathBuf>,
}

/// Loads a model from `path`: an exported `.safetensors` file, a run directory (its latest
/// checkpoint), its `checkpoints/` directory, or one checkpoint set (`checkpoints/step-…`).
pub fn load(path: &Path, device: &Device) -> Result<TrainedModel, WeightsError> {
    if path.is_file() {
        return load_safetensors(path, device);
    }
    if !path.is_dir() {
        return Err(file_error(
            path,
            "no such file or directory (expected a run directory, a checkpoint or a .safetensors export)",
        ));
    }
    let (run_dir, set) = checkpoint_set(path)?;
    let card = ModelCard::load(&run_dir)?;
    let weights = set.join(crate::checkpoint::MODEL);
    let mut model = AnyModel::init(&card.architecture, device);
    // A checkpoint holds the trainee, whose model is its `model` field.
    let mut store = BurnpackStore::from_file(&weights).with_remap_pattern(r"^model\.", "");
    let applied = model
        .load_from(&mut store)
        .map_err(|e| file_error(&weights, e))?;
    check_applied(&weights, &applied)?;
    Ok(TrainedModel {
        card,
        model,
        step: crate::checkpoint::step_of(&set),
        source: set,
        run_dir: Some(run_dir),
    })
}

/// The run directory and the checkpoint set that `path` names.
fn checkpoint_set(path: &Path) -> Result<(PathBuf, PathBuf), WeightsError> {
    let path = path.to_path_buf();
    let (run_dir, set) = if path.join(CARD_FILE).is_file() {
        let checkpoints = path.join(crate::checkpoint::CHECKPOINTS);
        let set = crate::checkpoint::latest_set(&checkpoints).map_err(|e| file_error(&path, e))?;
        (path, set)
    } else if path.parent().is_some_and(|p| p.join(CARD_FILE).is_file()) {
        let set = crate::checkpoint::latest_set(&path).map_err(|e| file_error(&path, e))?;
        (path.parent().expect("checked").to_path_buf(), set)
    } else if let Some(run_dir) = path
        .parent()
        .and_then(Path::parent)
        .filter(|p| p.join(CARD_FILE).is_file())
    {
        (run_dir.to_path_buf(), path.clone())
    } else {
        return Err(file_error(
            &path,
            format!(
                "not a run, its checkpoints or a checkpoint set: no {CARD_FILE} here or up to two levels above \
                 (runs write it when they start)"
            ),
        ));
    };
    Ok((run_dir, set))
}

fn check_applied(path: &Path, applied: &ApplyResult) -> Result<(), WeightsError> {
    let mut problems: Vec<String> = applied.errors.iter().map(|e| format!("{e:?}")).collect();
    if !applied.missing.is_empty() {
        let names: Vec<&str> = applied.missing.iter().map(|(p, _)| p.as_str()).collect();
        problems.push(format!("missing {}", names.join(", ")));
    }
    if !applied.unused.is_empty() {
        problems.push(format!(
            "tensors the model does not have: {}",
            applied.unused.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            message: format!("the weights do not fit the model: {}", problems.join("; ")),
        })
    }
}

/// Writes `trained` to `out` as SafeTensors with PyTorch's names and layouts (a Linear's
/// weight `[out, in]`, a LayerNorm's `weight`/`bias`) and the card in the metadata.
pub fn export_safetensors(trained: &TrainedModel, out: &Path) -> Result<(), WeightsError> {
    let card = &trained.card;
    let json = |value: Result<String, serde_json::Error>| value.expect("a card serialises");
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .metadata(
            META_ARCHITECTURE,
            json(serde_json::to_string(&card.architecture)),
        )
        .metadata(META_OBJECTIVE, json(serde_json::to_string(&card.objective)))
        .metadata(
            META_CONF_INPUT,
            json(serde_json::to_string(&card.conf_input)),
        )
        .metadata(META_TOKENIZER, json(serde_json::to_string(&card.tokenizer)));
    if let Some(step) = trained.step {
        store = store.metadata(META_STEP, step.to_string());
    }
    trained
        .model
        .save_into(&mut store)
        .map_err(|e| file_error(out, e))?;
    let bytes = store.get_bytes().map_err(|e| file_error(out, e))?;
    write_atomic(out, &bytes).map_err(|e| file_error(out, e))
}

/// Reads an export written by [`export_safetensors`].
pub fn load_safetensors(path: &Path, device: &Device) -> Result<TrainedModel, WeightsError> {
    let export = Export::read(path)?;
    let (card, step) = export.card()?;
    let mut model = AnyModel::init(&card.architecture, device);
    export.apply_to(&mut model)?;
    Ok(TrainedModel {
        card,
        model,
        step,
        source: path.to_path_buf(),
        run_dir: None,
    })
}

/// A whole SafeTensors file, read once and checked: a file that is not one (cut short,
/// another format) is an error naming it.
pub struct Export {
    path: PathBuf,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

impl Export {
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
        let unreadable = |e: safetensors::SafeTensorError| {
            file_error(
                path,
                format!(
                    "not a readable SafeTensors file ({e}): give a .safetensors file written by \
                     `lookahead export` (was it cut short?), a run directory or a checkpoint set"
                ),
            )
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(unreadable)?;
        // The header parses on its own; the tensors must also lie inside the file.
        safetensors::SafeTensors::deserialize(&bytes).map_err(unreadable)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            metadata,
        })
    }

    /// The card, and the step when recorded.
    pub fn card(&self) -> Result<(ModelCard, Option<usize>), WeightsError> {
        let path = &self.path;
        let get = |key: &str| -> Result<&String, WeightsError> {
            self.metadata.get(key).ok_or_else(|| {
                file_error(
                    path,
                    format!("not a lookahead export: its metadata has no '{key}'"),
                )
            })
        };
        let bad =
            |key: &str, e: serde_json::Error| file_error(path, format!("metadata '{key}': {e}"));
        let card = ModelCard {
            architecture: serde_json::from_str(get(META_ARCHITECTURE)?)
                .map_err(|e| bad(META_ARCHITECTURE, e))?,
            objective: serde_json::from_str(get(META_OBJECTIVE)?)
                .map_err(|e| bad(META_OBJECTIVE, e))?,
            conf_input: serde_json::from_str(get(META_CONF_INPUT)?)
                .map_err(|e| bad(META_CONF_INPUT, e))?,
            tokenizer: serde_json::from_str(get(META_TOKENIZER)?)
                .map_err(|e| bad(META_TOKENIZER, e))?,
        };
        let step = self.metadata.get(META_STEP).and_then(|s| s.parse().ok());
        Ok((card, step))
    }

    /// Overwrites every parameter of `model`; the export must hold exactly this model's
    /// parameters, with the same shapes.
    pub fn apply_to(self, model: &mut AnyModel) -> Result<(), WeightsError> {
        let mut store =
            SafetensorsStore::from_bytes(Some(self.bytes)).with_from_adapter(PyTorchToBurnAdapter);
        let applied = model
            .load_from(&mut store)
            .map_err(|e| WeightsError::Mismatch {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        check_applied(&self.path, &applied)
    }
}
