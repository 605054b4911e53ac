//! `adapter_config.json`: PEFT's `LoraConfig` as written by `save_pretrained`.
//!
//! Only the fields CorDA needs are typed; every other key is kept verbatim in `extra`, so a file
//! written by PEFT reads and writes back unchanged (PEFT itself drops unknown keys with a warning,
//! so extra keys never hurt loading).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::pattern::{full_match, looks_like_regex};
use crate::util::atomic::write_file_atomic;
use crate::{CordaError, Result};

/// The file name PEFT uses for the config of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// PEFT's `LoraConfig` (the parts CorDA reads), plus every other key untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `"LORA"` here; PEFT needs it to pick the config class.
    pub peft_type: String,
    /// Default rank of every module (overridden by `rank_pattern`).
    #[serde(default = "default_r")]
    pub r: usize,
    /// Written as an integer when integral, as PEFT does for user-given alphas.
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub lora_alpha: f64,
    /// Module-name suffixes. PEFT also accepts one regex string (full match); that reads as a
    /// one-element list and is written back as a string.
    #[serde(
        default,
        serialize_with = "ser_targets",
        deserialize_with = "de_targets"
    )]
    pub target_modules: Vec<String>,
    /// Per-module ranks keyed by module-name suffix (PEFT's `get_pattern_key`).
    #[serde(default, deserialize_with = "de_null_default")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, keyed like `rank_pattern`.
    #[serde(
        default,
        serialize_with = "ser_num_map",
        deserialize_with = "de_null_default"
    )]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// rsLoRA scaling alpha / sqrt(r) instead of alpha / r.
    #[serde(default, deserialize_with = "de_null_default")]
    pub use_rslora: bool,
    /// `true` in every file we write: a string such as `"corda"` would make PEFT re-run the
    /// initialisation when loading.
    #[serde(default = "default_init")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Every other key of the file, kept so that a PEFT config round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

fn default_init() -> Value {
    Value::Bool(true)
}

/// A JSON number for `x`: an integer when `x` is integral (PEFT writes `16`, not `16.0`).
pub(crate) fn json_number(x: f64) -> Value {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn ser_num<S: Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    json_number(*x).serialize(s)
}

fn ser_num_map<S: Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let obj: Map<String, Value> = m
        .iter()
        .map(|(k, v)| (k.clone(), json_number(*v)))
        .collect();
    obj.serialize(s)
}

fn ser_targets<S: Serializer>(t: &[String], s: S) -> std::result::Result<S::Ok, S::Error> {
    match t {
        [one] if looks_like_regex(one) => one.serialize(s),
        _ => t.serialize(s),
    }
}

fn de_targets<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Targets {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Targets>::deserialize(d)? {
        None => Vec::new(),
        Some(Targets::One(s)) => vec![s],
        Some(Targets::Many(v)) => v,
    })
}

/// PEFT sometimes writes `null` for an empty pattern; read it as the default.
fn de_null_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Sort the keys of every object, like Python's `json.dumps(sort_keys=True)`.
fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// Does the pattern key `k` match `module` like PEFT's `re.match(rf"(.*\.)?({k})$", module)`?
/// Plain names (the common case) are taken literally: the whole name, or a suffix after a '.'.
fn key_matches(k: &str, module: &str) -> bool {
    if looks_like_regex(k) {
        return full_match(&format!("(.*\\.)?({k})"), module).unwrap_or_else(|| {
            tracing::warn!(
                "pattern `{k}` uses regex syntax this crate does not support; it matches nothing"
            );
            false
        });
    }
    suffix_match(k, module)
}

/// `module` is `k` or ends with `.k`.
fn suffix_match(k: &str, module: &str) -> bool {
    module == k
        || (module.len() > k.len()
            && module.ends_with(k)
            && module[..module.len() - k.len()].ends_with('.'))
}

impl AdapterConfig {
    /// A LoRA config with PEFT's defaults for everything CorDA does not set.
    pub fn new_lora(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> Self {
        let mut extra = Map::new();
        for (k, v) in [
            ("auto_mapping", Value::Null),
            ("bias", Value::from("none")),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", Value::Bool(false)),
            ("inference_mode", Value::Bool(true)),
            ("layer_replication", Value::Null),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("loftq_config", Value::Object(Map::new())),
            ("lora_bias", Value::Bool(false)),
            ("lora_dropout", Value::from(0.0)),
            ("megatron_config", Value::Null),
            ("megatron_core", Value::from("megatron.core")),
            ("modules_to_save", Value::Null),
            ("revision", Value::Null),
            ("task_type", Value::Null),
            ("use_dora", Value::Bool(false)),
        ] {
            extra.insert(k.to_string(), v);
        }
        Self {
            peft_type: "LORA".to_string(),
            r,
            lora_alpha,
            target_modules,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            init_lora_weights: Value::Bool(true),
            base_model_name_or_path: None,
            extra,
        }
    }

    /// PEFT's `get_pattern_key`: the first key `k` whose regex `(.*\.)?(k)$` matches `module`.
    /// Plain keys are taken literally (the whole name or a suffix at a '.' boundary); keys with
    /// regex syntax go through the small matcher in [`super::pattern`].
    pub fn pattern_key<'a>(
        mut keys: impl Iterator<Item = &'a String>,
        module: &str,
    ) -> Option<&'a String> {
        keys.find(|k| key_matches(k, module))
    }

    /// The rank PEFT gives `module`: its `rank_pattern` entry, else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        Self::pattern_key(self.rank_pattern.keys(), module)
            .and_then(|k| self.rank_pattern.get(k).copied())
            .unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module`: its `alpha_pattern` entry, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        Self::pattern_key(self.alpha_pattern.keys(), module)
            .and_then(|k| self.alpha_pattern.get(k).copied())
            .unwrap_or(self.lora_alpha)
    }

    /// The LoRA scaling of `module`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Whether PEFT would wrap `module`: its last path component (or the whole path, or a
    /// suffix at a '.' boundary) is listed in `target_modules`.
    /// A single regex-like entry is PEFT's string form, matched with `re.fullmatch`.
    pub fn is_target(&self, module: &str) -> bool {
        match self.target_modules.as_slice() {
            [one] if looks_like_regex(one) => full_match(one, module).unwrap_or_else(|| {
                tracing::warn!("target_modules `{one}` uses regex syntax this crate does not support; it matches nothing");
                false
            }),
            list => list.iter().any(|t| suffix_match(t, module)),
        }
    }

    /// Read `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CordaError::Adapter(format!(
                    "{} not found: {} is not a PEFT adapter directory (it needs {CONFIG_FILE} and adapter_model.safetensors)",
                    path.display(),
                    dir.display()
                ))
            } else {
                CordaError::io(&path, e)
            }
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|source| CordaError::Json {
            path: path.clone(),
            source,
        })?;
        if config.peft_type != "LORA" {
            return Err(CordaError::Adapter(format!(
                "{}: peft_type is {:?}, but only LoRA adapters (\"LORA\") are supported",
                path.display(),
                config.peft_type
            )));
        }
        if config.r == 0 {
            return Err(CordaError::Adapter(format!(
                "{}: r must be at least 1",
                path.display()
            )));
        }
        Ok(config)
    }

    /// The JSON text PEFT would write: keys sorted at every level, indent 2, no trailing newline.
    pub fn to_json_string(&self) -> Result<String> {
        let value = serde_json::to_value(self).map_err(|e| {
            CordaError::Adapter(format!("cannot serialise the adapter config: {e}"))
        })?;
        serde_json::to_string_pretty(&sort_keys(value))
            .map_err(|e| CordaError::Adapter(format!("cannot serialise the adapter config: {e}")))
    }

    /// Write `dir/adapter_config.json` (atomically; `dir` must exist).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = self.to_json_string()?;
        write_file_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<String> {
        ["q_proj", "v_proj"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pattern_key_matches_at_dot_boundary() {
        let keys: Vec<String> = vec!["q_proj".into(), "layers.1.self_attn.v_proj".into()];
        let m = "model.layers.1.self_attn.v_proj";
        assert_eq!(AdapterConfig::pattern_key(keys.iter(), m), Some(&keys[1]));
        assert_eq!(
            AdapterConfig::pattern_key(keys.iter(), "model.layers.0.self_attn.q_proj"),
            Some(&keys[0])
        );
        assert_eq!(
            AdapterConfig::pattern_key(keys.iter(), "model.layers.0.self_attn.xq_proj"),
            None
        );
        assert_eq!(
            AdapterConfig::pattern_key(keys.iter(), "q_proj"),
            Some(&keys[0])
        );
    }

    #[test]
    fn rank_alpha_scaling() {
        let mut c = AdapterConfig::new_lora(8, 16.0, targets());
        c.rank_pattern.insert("layers.0.self_attn.q_proj".into(), 4);
        c.alpha_pattern.insert("v_proj".into(), 2.0);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 8);
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj"), 4.0);
        assert_eq!(c.scaling_for("model.layers.0.self_attn.v_proj"), 0.25);
        c.use_rslora = true;
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj"), 8.0);
        assert!(c.is_target("model.layers.0.self_attn.q_proj"));
        assert!(!c.is_target("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn alpha_is_integral_when_possible_and_keys_sorted() {
        let mut c = AdapterConfig::new_lora(8, 16.0, targets());
        let s = c.to_json_string().unwrap();
        assert!(s.contains("\"lora_alpha\": 16,"), "{s}");
        let keys: Vec<&str> = s.lines().filter(|l| l.starts_with("  \"")).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        c.lora_alpha = 16.0 * 2f64.sqrt();
        let s = c.to_json_string().unwrap();
        assert!(s.contains("\"lora_alpha\": 22.62741699796"), "{s}");
    }

    #[test]
    fn regex_target_string_round_trips() {
        let json = r#"{"peft_type": "LORA", "r": 4, "target_modules": ".*\\.(q|v)_proj", "rank_pattern": null}"#;
        let c: AdapterConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.target_modules, vec![".*\\.(q|v)_proj".to_string()]);
        assert!(c.rank_pattern.is_empty());
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["target_modules"], Value::from(".*\\.(q|v)_proj"));
        assert!(c.is_target("model.layers.0.self_attn.v_proj"));
        assert!(!c.is_target("model.layers.0.self_attn.k_proj"));
        let keys = [r"layers\.1\..*_proj".to_string()];
        assert!(AdapterConfig::pattern_key(keys.iter(), "model.layers.1.mlp.up_proj").is_some());
        assert!(AdapterConfig::pattern_key(keys.iter(), "model.layers.0.mlp.up_proj").is_none());
    }

    #[test]
    fn fixture_configs_round_trip_byte_for_byte() {
        let root = corda_testdata::peft_tiny_llama();
        for mode in ["kpm", "ipm"] {
            for kind in ["corda_init", "trained", "lora"] {
                let dir = root.join(mode).join(kind);
                let original = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
                let c = AdapterConfig::read(&dir).unwrap();
                assert_eq!(c.to_json_string().unwrap(), original, "{}", dir.display());
            }
        }
    }
}
