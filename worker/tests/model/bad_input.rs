//! Bad checkpoints and bad requests give errors that name the problem; nothing panics.

use crate::fixtures::fixture_dir;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_worker::generate::{GenerateRequest, generate};
use shardseek_worker::kv::KvDtype;
use shardseek_worker::model::{ExpertSelection, Model};
use std::path::Path;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let e = e.unwrap();
        let dst = tmp.path().join(e.file_name());
        std::fs::copy(e.path(), &dst).unwrap();
        let mut perm = std::fs::metadata(&dst).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&dst, perm).unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, ExpertSelection::All) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_config_is_an_error() {
    let t = copy_fixture("open-bf16");
    std::fs::write(t.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(t.path());
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn unsupported_values_name_the_key() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("scoring_func", serde_json::json!("softmax"), "scoring_func"),
        ("topk_method", serde_json::json!("greedy"), "topk_method"),
        ("hidden_size", serde_json::json!("big"), "hidden_size"),
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "rope_scaling.type",
        ),
        (
            "quantization_config",
            serde_json::json!({"quant_method": "awq"}),
            "quantization_config.quant_method",
        ),
        (
            "quantization_config",
            serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}),
            "quantization_config.weight_block_size",
        ),
        ("n_group", serde_json::json!(3), "n_group"),
    ];
    for (key, val, named) in cases {
        let t = copy_fixture("open-bf16");
        edit_config(t.path(), |v| v[key] = val.clone());
        let e = load_err(t.path());
        assert!(
            e.contains(&format!("`{named}`")),
            "setting {key}={val}: {e}"
        );
    }
    let t = copy_fixture("open-bf16");
    edit_config(t.path(), |v| {
        v.as_object_mut().unwrap().remove("kv_lora_rank");
    });
    let e = load_err(t.path());
    assert!(e.contains("`kv_lora_rank`") && e.contains("missing"), "{e}");
}

#[test]
fn missing_tensor_names_it() {
    // The bf16 fixture has two layers; a config asking for three needs tensors it lacks.
    let t = copy_fixture("open-bf16");
    edit_config(t.path(), |c| c["num_hidden_layers"] = serde_json::json!(3));
    let e = load_err(t.path());
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn index_naming_an_absent_tensor_is_an_error() {
    let t = copy_fixture("open-bf16");
    let idx = t.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["weight_map"]["model.layers.0.extra.weight"] =
        serde_json::json!("model-00001-of-00003.safetensors");
    std::fs::write(&idx, v.to_string()).unwrap();
    let e = load_err(t.path());
    assert!(
        e.contains("model.layers.0.extra.weight") && e.contains("model-00001-of-00003.safetensors"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_file_and_shape() {
    let t = copy_fixture("open-bf16");
    // A larger kv_lora_rank makes every kv tensor mis-shaped against the config.
    edit_config(t.path(), |c| c["kv_lora_rank"] = serde_json::json!(96));
    let e = load_err(t.path());
    assert!(
        e.contains("kv_a_proj_with_mqa.weight") || e.contains("kv_a_layernorm"),
        "{e}"
    );
    assert!(
        e.contains(".safetensors") && e.contains("expected ["),
        "{e}"
    );
}

#[test]
fn truncated_shard_is_an_error() {
    let t = copy_fixture("open-fp8");
    let p = t.path().join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    let e = load_err(t.path());
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn bad_requests_are_errors() {
    let model = Model::load(&fixture_dir("open-bf16"), ExpertSelection::All).unwrap();
    let base = GenerateRequest {
        prompt: vec![1, 2, 3],
        max_tokens: 2,
        sampling: SamplingParams::default(),
        seed: 0,
        top_logprobs: 0,
        echo: false,
        ignore_eos: true,
        kv_dtype: KvDtype::F32,
    };
    let vocab = model.cfg.vocab_size as u32;
    let e = generate(
        &model,
        &GenerateRequest {
            prompt: vec![1, vocab],
            ..base.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("token id {vocab}")) && e.contains("vocab_size"),
        "{e}"
    );
    let e = generate(
        &model,
        &GenerateRequest {
            prompt: vec![],
            ..base.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("empty"), "{e}");
    let bad_t = GenerateRequest {
        sampling: SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        ..base.clone()
    };
    assert!(
        generate(&model, &bad_t)
            .unwrap_err()
            .to_string()
            .contains("temperature")
    );
    let bad_p = GenerateRequest {
        sampling: SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        ..base
    };
    assert!(
        generate(&model, &bad_p)
            .unwrap_err()
            .to_string()
            .contains("top_p")
    );
}
