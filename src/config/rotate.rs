//! `tokengate keys rotate`: adds a new data-encryption key to a config file's `[vault]` section
//! and makes it the active one, keeping the file's comments and layout.
//!
//! Instances read keys at start-up, so the new key takes effect as they are rolled; old and new
//! instances both open every record because the old keys stay in the ring. The re-encryption job
//! (`domain::rekey`) then re-seals older records; an old key is removed from the file only when
//! `tokengate_rekey_old_key_records` reads 0 (docs/security.md, "Keyring and rotation").

use toml_edit::{DocumentMut, Item, Value};

use crate::crypto::valid_key_id;

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
    let mut doc: DocumentMut = config_text
        .parse()
        .map_err(|e: toml_edit::TomlError| RotateError::Parse(e.message().to_owned()))?;
    let vault = doc
        .get_mut("vault")
        .and_then(Item::as_table_like_mut)
        .ok_or(RotateError::NoKeys)?;
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
    let id = match key_id {
        Some(id) => id.to_owned(),
        None => {
            let highest = existing
                .iter()
                .filter_map(|k| k.strip_prefix('k')?.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            format!("k{}", highest + 1)
        }
    };
    if !valid_key_id(&id) {
        return Err(RotateError::BadKeyId(id));
    }
    if existing.contains(&id) {
        return Err(RotateError::DuplicateKeyId(id));
    }
    match keys {
        Item::Value(Value::InlineTable(t)) => {
            t.insert(&id, Value::from(new_key_b64));
            t.fmt();
        }
        Item::Table(t) => {
            t.insert(&id, Item::Value(Value::from(new_key_b64)));
        }
        _ => return Err(RotateError::KeysNotATable),
    }
    // The value is replaced in place, so comments above the line (the key's decor) stay.
    if let Some(active) = vault.get_mut("active_key_id") {
        *active = Item::Value(Value::from(id.as_str()));
    }
    Ok(Rotated {
        text: doc.to_string(),
        key_id: id,
    })
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
        // The key material never appears in an error.
        let Err(e) = rotate_data_key(FILE, Some("k1"), "SECRETKEY") else {
            panic!("a duplicate key id must be refused");
        };
        assert!(!e.to_string().contains("SECRETKEY"));
    }
}
