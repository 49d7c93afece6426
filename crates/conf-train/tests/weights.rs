//! Exported weights come back as the same model: export → import gives identical logits, and a
//! file that is not a whole export is refused with its name.

use burn::module::Module;
use burn::prelude::*;
use conf_data::TokenizerSpec;
use conf_model::init::Perturb;
use conf_model::{AttentionMask, ConfHead, ConfidenceGptConfig, GptConfig};
use conf_train::ConfInput;
use conf_train::ObjectiveKind;
use conf_train::weights::{
    AnyModel, Architecture, ModelCard, TrainedModel, WeightsError, export_safetensors,
    load_safetensors,
};

fn trained(architecture: Architecture, device: &Device) -> TrainedModel {
    let model = match AnyModel::init(&architecture, device) {
        AnyModel::Standard(m) => AnyModel::Standard(m.map(&mut Perturb { std: 0.05 })),
        AnyModel::Confidence(m) => AnyModel::Confidence(m.map(&mut Perturb { std: 0.05 })),
    };
    TrainedModel {
        card: ModelCard {
            architecture,
            objective: ObjectiveKind::Teacher,
            conf_input: ConfInput::Zeros,
            tokenizer: TokenizerSpec::Byte,
        },
        model,
        step: Some(17),
        source: "memory".into(),
        run_dir: None,
    }
}

fn logits(model: &AnyModel, ids: &Tensor<2, Int>) -> Vec<f32> {
    let out = match model {
        AnyModel::Standard(m) => m.forward(ids.clone(), &AttentionMask::Causal),
        AnyModel::Confidence(m) => {
            let conf = Tensor::<2>::ones(ids.dims(), &ids.device()) * 0.7;
            let out = m.forward(ids.clone(), conf, &AttentionMask::Causal);
            Tensor::cat(vec![out.logits, out.confidence.unsqueeze_dim(2)], 2)
        }
    };
    out.into_data().try_into_vec_as::<f32>().unwrap()
}

#[test]
fn export_then_import_gives_identical_logits_and_the_card() {
    let device = Device::flex();
    device.seed(11);
    let gpt = GptConfig::new(256, 12, 16, 3, 2, 48);
    let ids = Tensor::<2, Int>::from_data([[1, 200, 3, 4, 90, 6], [7, 8, 255, 0, 11, 12]], &device);
    let dir = tempfile::tempdir().unwrap();
    for architecture in [
        Architecture::Standard(gpt.clone()),
        Architecture::Confidence(
            ConfidenceGptConfig::new(gpt.clone()).with_conf_head(ConfHead::Probe),
        ),
    ] {
        let original = trained(architecture, &device);
        let path = dir
            .path()
            .join(format!("{}.safetensors", original.card.architecture.name()));
        export_safetensors(&original, &path).unwrap();
        let loaded = load_safetensors(&path, &device).unwrap();
        assert_eq!(loaded.card, original.card);
        assert_eq!(loaded.step, Some(17));
        assert_eq!(logits(&loaded.model, &ids), logits(&original.model, &ids));
    }
}

#[test]
fn a_cut_or_foreign_file_is_an_error_naming_it() {
    let device = Device::flex();
    let gpt = GptConfig::new(256, 8, 8, 1, 2, 16);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("whole.safetensors");
    export_safetensors(&trained(Architecture::Standard(gpt), &device), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let message = |e: WeightsError| e.to_string();

    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = message(load_safetensors(&cut, &device).unwrap_err());
    assert!(
        e.contains("cut.safetensors") && e.contains("SafeTensors"),
        "{e}"
    );

    // A SafeTensors file without a card: the tensors of another program.
    let foreign = dir.path().join("foreign.safetensors");
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&1.0f32.to_le_bytes());
    std::fs::write(&foreign, file).unwrap();
    let e = message(load_safetensors(&foreign, &device).unwrap_err());
    assert!(
        e.contains("foreign.safetensors") && e.contains("not a lookahead export"),
        "{e}"
    );
}
