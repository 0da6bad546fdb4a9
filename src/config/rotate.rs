//! `tokengate keys rotate`: adds a new data-encryption key to a config file's `[vault]` section
//! and makes it the active one, keeping the file's comments and layout; with
//! `--fingerprint-key`, a new fingerprint key too.
//!
//! Instances read keys at start-up, so the new key takes effect as they are rolled; old and new
//! instances both open every record because the old keys stay in the ring. The re-encryption job
//! (`domain::rekey`) then re-seals older records; an old key is removed from the file only when
//! `tokengate_rekey_old_key_records` reads 0 (docs/security.md, "Keyring and rotation"). A new
//! fingerprint key goes to `vault.fingerprint_keys` beside the old one (which stays, as
//! `vault.fingerprint_key` or its entry) and becomes `vault.active_fingerprint_key_id`; the
//! re-index job (`domain::fp_reindex`) then moves the dedup index onto it, and the old key is
//! removed once `tokengate_fp_reindex_complete` reads 1 (docs/security.md, "Rotating the
//! fingerprint key").

use toml_edit::{DocumentMut, Item, TableLike, Value};

use crate::crypto::{IMPLICIT_FINGERPRINT_KEY_ID, valid_key_id};

/// Why a config file could not be rotated. Never carries key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotateError {
    #[error("the file is not valid TOML: {0}")]
    Parse(String),
    #[error(
        "the file has no [vault] keys and active_key_id; rotation adds a key to an existing key set (generate the first with `tokengate keys new`)"
    )]
    NoKeys,
    #[error("[vault] keys must be a table of key id = base64 key")]
    KeysNotATable,
    #[error("key id `{0}` must be 1-32 characters of [A-Za-z0-9_-]")]
    BadKeyId(String),
    #[error("key id `{0}` is already in [vault] keys")]
    DuplicateKeyId(String),
    #[error(
        "the file has no [vault] fingerprint_key or fingerprint_keys; rotation adds a key to an existing one (generate the first with `tokengate keys new`)"
    )]
    NoFingerprintKeys,
    #[error("[vault] fingerprint_keys must be a table of key id = base64 key")]
    FingerprintKeysNotATable,
    #[error("key id `{0}` is already a fingerprint key id")]
    DuplicateFingerprintKeyId(String),
}

/// The rewritten file and the id of the key now active.
pub struct Rotated {
    pub text: String,
    pub key_id: String,
}

/// Adds `new_key_b64` to `[vault] keys` under `key_id` (default: `k<N+1>` after the highest
/// `k<N>` present) and sets `active_key_id` to it.
pub fn rotate_data_key(
    config_text: &str,
    key_id: Option<&str>,
    new_key_b64: &str,
) -> Result<Rotated, RotateError> {
    edit_vault(config_text, RotateError::NoKeys, |vault| {
        if vault.get("active_key_id").and_then(Item::as_str).is_none() {
            return Err(RotateError::NoKeys);
        }
        let keys = vault.get_mut("keys").ok_or(RotateError::NoKeys)?;
        // `keys = { k1 = "..." }` (inline) or a `[vault.keys]` table: both are kept as they are.
        let existing: Vec<String> = keys
            .as_table_like()
            .ok_or(RotateError::KeysNotATable)?
            .iter()
            .map(|(k, _)| k.to_owned())
            .collect();
        if existing.is_empty() {
            return Err(RotateError::NoKeys);
        }
        let id = new_key_id(&existing, key_id, "k", RotateError::DuplicateKeyId)?;
        if !insert_key(keys, &id, new_key_b64) {
            return Err(RotateError::KeysNotATable);
        }
        // The value is replaced in place, so comments above the line (the key's decor) stay.
        if let Some(active) = vault.get_mut("active_key_id") {
            *active = Item::Value(Value::from(id.as_str()));
        }
        Ok(id)
    })
}

/// Adds `new_key_b64` to `[vault] fingerprint_keys` under `key_id` (default: `fp<N+1>` after the
/// highest `fp<N>` present, the one-key `fingerprint_key` being `fp0`) and sets
/// `active_fingerprint_key_id` to it. The current keys stay: until the re-index completes,
/// instances look cards up under them too.
pub fn rotate_fingerprint_key(
    config_text: &str,
    key_id: Option<&str>,
    new_key_b64: &str,
) -> Result<Rotated, RotateError> {
    edit_vault(config_text, RotateError::NoFingerprintKeys, |vault| {
        let mut existing: Vec<String> = Vec::new();
        if vault
            .get("fingerprint_key")
            .and_then(Item::as_str)
            .is_some()
        {
            existing.push(IMPLICIT_FINGERPRINT_KEY_ID.to_owned());
        }
        if let Some(keys) = vault.get("fingerprint_keys") {
            let keys = keys
                .as_table_like()
                .ok_or(RotateError::FingerprintKeysNotATable)?;
            existing.extend(keys.iter().map(|(k, _)| k.to_owned()));
        }
        if existing.is_empty() {
            return Err(RotateError::NoFingerprintKeys);
        }
        let id = new_key_id(
            &existing,
            key_id,
            "fp",
            RotateError::DuplicateFingerprintKeyId,
        )?;
        let keys = vault
            .entry("fingerprint_keys")
            .or_insert(Item::Value(Value::InlineTable(Default::default())));
        if !insert_key(keys, &id, new_key_b64) {
            return Err(RotateError::FingerprintKeysNotATable);
        }
        match vault.get_mut("active_fingerprint_key_id") {
            // In place, keeping the line's comments.
            Some(active) => *active = Item::Value(Value::from(id.as_str())),
            None => {
                vault.insert(
                    "active_fingerprint_key_id",
                    Item::Value(Value::from(id.as_str())),
                );
            }
        }
        Ok(id)
    })
}

/// Parses `config_text`, lets `edit` change its `[vault]` table (`missing` when there is none)
/// and answers the file rewritten with the new key's id `edit` returns.
fn edit_vault(
    config_text: &str,
    missing: RotateError,
    edit: impl FnOnce(&mut dyn TableLike) -> Result<String, RotateError>,
) -> Result<Rotated, RotateError> {
    let mut doc: DocumentMut = config_text
        .parse()
        .map_err(|e: toml_edit::TomlError| RotateError::Parse(e.message().to_owned()))?;
    let vault = doc
        .get_mut("vault")
        .and_then(Item::as_table_like_mut)
        .ok_or(missing)?;
    let key_id = edit(vault)?;
    Ok(Rotated {
        text: doc.to_string(),
        key_id,
    })
}

/// The new key's id: `key_id`, or `<prefix><N+1>` after the highest `<prefix><N>` in `existing`;
/// refused when malformed or already in `existing` (`taken`).
fn new_key_id(
    existing: &[String],
    key_id: Option<&str>,
    prefix: &str,
    taken: fn(String) -> RotateError,
) -> Result<String, RotateError> {
    let id = match key_id {
        Some(id) => id.to_owned(),
        None => {
            let highest = existing
                .iter()
                .filter_map(|k| k.strip_prefix(prefix)?.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            format!("{prefix}{}", highest + 1)
        }
    };
    if !valid_key_id(&id) {
        return Err(RotateError::BadKeyId(id));
    }
    if existing.contains(&id) {
        return Err(taken(id));
    }
    Ok(id)
}

/// Adds `id = key` to a key table, kept in its form: `{ .. }` inline or a `[..]` table. `false`
/// when `keys` is neither.
fn insert_key(keys: &mut Item, id: &str, key: &str) -> bool {
    match keys {
        Item::Value(Value::InlineTable(t)) => {
            t.insert(id, Value::from(key));
            t.fmt();
        }
        Item::Table(t) => {
            t.insert(id, Item::Value(Value::from(key)));
        }
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# production settings
mode = "production"

[vault]
# rotated yearly
active_key_id = "k1"
keys = { k1 = "AAAA" }
fingerprint_key = "BBBB"
"#;

    #[test]
    fn adds_the_next_key_and_activates_it_keeping_comments() {
        let r = rotate_data_key(FILE, None, "CCCC").unwrap();
        assert_eq!(r.key_id, "k2");
        assert!(r.text.contains("# production settings"));
        assert!(r.text.contains("# rotated yearly"));
        let v: DocumentMut = r.text.parse().unwrap();
        assert_eq!(v["vault"]["active_key_id"].as_str(), Some("k2"));
        assert_eq!(v["vault"]["keys"]["k1"].as_str(), Some("AAAA"));
        assert_eq!(v["vault"]["keys"]["k2"].as_str(), Some("CCCC"));
        assert_eq!(v["vault"]["fingerprint_key"].as_str(), Some("BBBB"));
        // And again: k3, with k1 and k2 kept so every record still opens.
        let r2 = rotate_data_key(&r.text, None, "DDDD").unwrap();
        assert_eq!(r2.key_id, "k3");
        let v: DocumentMut = r2.text.parse().unwrap();
        assert_eq!(v["vault"]["keys"].as_table_like().unwrap().len(), 3);
    }

    #[test]
    fn works_with_a_keys_table_and_named_ids() {
        let file = "[vault]\nactive_key_id = \"2025\"\n\n[vault.keys]\n2025 = \"AAAA\"\n";
        let r = rotate_data_key(file, Some("2026-q1"), "CCCC").unwrap();
        let v: DocumentMut = r.text.parse().unwrap();
        assert_eq!(v["vault"]["active_key_id"].as_str(), Some("2026-q1"));
        assert_eq!(v["vault"]["keys"]["2025"].as_str(), Some("AAAA"));
        assert_eq!(v["vault"]["keys"]["2026-q1"].as_str(), Some("CCCC"));
    }

    #[test]
    fn adds_a_fingerprint_key_beside_the_one_key_form_and_activates_it() {
        let r = rotate_fingerprint_key(FILE, None, "FFFF").unwrap();
        assert_eq!(r.key_id, "fp1");
        assert!(r.text.contains("# rotated yearly"));
        let v: DocumentMut = r.text.parse().unwrap();
        // The old key stays (instances look cards up under it until the re-index is done).
        assert_eq!(v["vault"]["fingerprint_key"].as_str(), Some("BBBB"));
        assert_eq!(v["vault"]["fingerprint_keys"]["fp1"].as_str(), Some("FFFF"));
        assert_eq!(
            v["vault"]["active_fingerprint_key_id"].as_str(),
            Some("fp1")
        );
        // The data keys are left alone.
        assert_eq!(v["vault"]["active_key_id"].as_str(), Some("k1"));
        assert_eq!(v["vault"]["keys"].as_table_like().unwrap().len(), 1);
        // And again: fp2, with fp0 and fp1 kept, the active id replaced in place.
        let r2 = rotate_fingerprint_key(&r.text, None, "GGGG").unwrap();
        assert_eq!(r2.key_id, "fp2");
        let v: DocumentMut = r2.text.parse().unwrap();
        assert_eq!(v["vault"]["fingerprint_keys"]["fp1"].as_str(), Some("FFFF"));
        assert_eq!(v["vault"]["fingerprint_keys"]["fp2"].as_str(), Some("GGGG"));
        assert_eq!(
            v["vault"]["active_fingerprint_key_id"].as_str(),
            Some("fp2")
        );
        assert_eq!(r2.text.matches("active_fingerprint_key_id").count(), 1);
    }

    #[test]
    fn a_file_rotated_twice_loads_and_validates() {
        use base64::Engine;
        // Real keys: the configuration's validation checks them.
        let k = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        let file = format!(
            "[vault]\nactive_key_id = \"k1\"\nkeys = {{ k1 = \"{}\" }}\nfingerprint_key = \"{}\"\n",
            k(1),
            k(2)
        );
        let r = rotate_data_key(&file, None, &k(3)).unwrap();
        let r = rotate_fingerprint_key(&r.text, Some("fp-2026"), &k(4)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokengate.toml");
        std::fs::write(&path, &r.text).unwrap();
        let cfg = crate::config::Config::load_with_env(Some(&path), &[]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.vault.active_key_id.as_deref(), Some("k2"));
        assert_eq!(cfg.vault.active_fingerprint_key(), "fp-2026");
        let ring: Vec<String> = cfg
            .vault
            .fingerprint_ring()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ring, ["fp0", "fp-2026"]);
    }

    #[test]
    fn refuses_what_it_cannot_rotate() {
        assert_eq!(
            rotate_data_key("mode = \"sandbox\"\n", None, "C").err(),
            Some(RotateError::NoKeys)
        );
        assert_eq!(
            rotate_data_key("[vault]\nkeys = {}\n", None, "C").err(),
            Some(RotateError::NoKeys)
        );
        assert_eq!(
            rotate_data_key(FILE, Some("k1"), "C").err(),
            Some(RotateError::DuplicateKeyId("k1".into()))
        );
        assert_eq!(
            rotate_data_key(FILE, Some("bad id!"), "C").err(),
            Some(RotateError::BadKeyId("bad id!".into()))
        );
        assert!(matches!(
            rotate_data_key("[vault\n", None, "C"),
            Err(RotateError::Parse(_))
        ));
        let no_fp = "[vault]\nactive_key_id = \"k1\"\nkeys = { k1 = \"A\" }\n";
        assert_eq!(
            rotate_fingerprint_key(no_fp, None, "C").err(),
            Some(RotateError::NoFingerprintKeys)
        );
        assert_eq!(
            rotate_fingerprint_key(FILE, Some("fp0"), "C").err(),
            Some(RotateError::DuplicateFingerprintKeyId("fp0".into()))
        );
        assert_eq!(
            rotate_fingerprint_key("[vault]\nfingerprint_keys = 3\n", None, "C").err(),
            Some(RotateError::FingerprintKeysNotATable)
        );
        // The key material never appears in an error.
        let Err(e) = rotate_data_key(FILE, Some("k1"), "SECRETKEY") else {
            panic!("a duplicate key id must be refused");
        };
        assert!(!e.to_string().contains("SECRETKEY"));
    }
}
