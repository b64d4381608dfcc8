//! The schema: collections, typed fields, uniqueness, references and merge
//! policies, loaded from TOML, with a stable fingerprint nodes compare.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::value::FieldValue;

/// The built-in CRM schema, as TOML.
pub const DEFAULT_SCHEMA_TOML: &str = include_str!("default_schema.toml");

/// The type of a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// A short string.
    String,
    /// Free text.
    Text,
    /// A signed 64-bit integer.
    Integer,
    /// A decimal number kept exactly as its canonical text (`-12.50`).
    Decimal,
    /// `true` or `false`.
    Boolean,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// Milliseconds since the Unix epoch (JSON: an integer).
    Timestamp,
    /// The id of a record of another collection.
    Reference,
}

impl FieldType {
    /// The type in words, for error messages.
    pub fn describe(&self) -> &'static str {
        match self {
            FieldType::String => "a string",
            FieldType::Text => "text",
            FieldType::Integer => "an integer",
            FieldType::Decimal => "a decimal number",
            FieldType::Boolean => "a boolean",
            FieldType::Date => "a date (YYYY-MM-DD)",
            FieldType::Timestamp => "a timestamp (ms since epoch)",
            FieldType::Reference => "a record id",
        }
    }
}

/// How a concurrent edit of one field by two sites is settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergePolicy {
    /// Automerge's deterministic winner; the losing value stays in history.
    #[default]
    Auto,
    /// Concurrent different values are a collision a person settles.
    Flag,
}

/// How a unique value is normalized before it is compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Trimmed (the default for unique fields).
    #[default]
    Trim,
    /// Trimmed and lower-cased (e-mail addresses).
    Email,
    /// Compared exactly as stored.
    None,
}

impl Normalize {
    /// Applies the normalization.
    pub fn apply(&self, s: &str) -> String {
        match self {
            Normalize::Trim => s.trim().to_string(),
            Normalize::Email => s.trim().to_lowercase(),
            Normalize::None => s.to_string(),
        }
    }
}

/// One declared field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDef {
    /// The field's type.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Must be present on create and may not be unset.
    #[serde(default)]
    pub required: bool,
    /// No two live records of the collection may share its normalized value.
    #[serde(default)]
    pub unique: bool,
    /// Normalization for uniqueness.
    #[serde(default)]
    pub normalize: Normalize,
    /// Merge policy for concurrent edits.
    #[serde(default)]
    pub policy: MergePolicy,
    /// For references: the collection pointed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// A composite unique group: no two live records share all of its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniqueGroup {
    /// The group's name, used in the `DUPLICATE_<NAME>` code.
    pub name: String,
    /// The fields, in order.
    pub fields: Vec<String>,
}

/// One collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionDef {
    /// Declared fields by name.
    pub fields: BTreeMap<String, FieldDef>,
    /// Composite unique groups.
    #[serde(default)]
    pub unique_groups: Vec<UniqueGroup>,
}

/// A unique constraint: a single unique field or a composite group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    /// The key's name: the field name, or the group name.
    pub name: String,
    /// The fields it covers.
    pub fields: Vec<String>,
}

impl UniqueKey {
    /// The stable refusal code, e.g. `DUPLICATE_EMAIL`.
    pub fn code(&self) -> String {
        format!("DUPLICATE_{}", self.name.to_ascii_uppercase())
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    collections: BTreeMap<String, CollectionDef>,
}

/// A validated schema with its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    collections: BTreeMap<String, CollectionDef>,
    fingerprint: String,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.as_bytes()[0].is_ascii_lowercase()
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

impl Schema {
    /// The built-in CRM schema.
    pub fn default_crm() -> Schema {
        Schema::from_toml(DEFAULT_SCHEMA_TOML).expect("the built-in schema is valid")
    }

    /// Parses and validates a schema.
    pub fn from_toml(text: &str) -> Result<Schema> {
        let file: SchemaFile =
            toml::from_str(text).map_err(|e| ModelError::InvalidSchema(e.to_string()))?;
        let bad = |m: String| Err(ModelError::InvalidSchema(m));
        if file.collections.is_empty() {
            return bad("no collections declared".into());
        }
        for (cname, c) in &file.collections {
            if !valid_name(cname) {
                return bad(format!(
                    "collection name `{cname}`: use lower-case letters, digits and `_`"
                ));
            }
            for (fname, f) in &c.fields {
                if !valid_name(fname) {
                    return bad(format!(
                        "field `{cname}.{fname}`: use lower-case letters, digits and `_` (names starting with `_` are reserved)"
                    ));
                }
                match (&f.ty, &f.to) {
                    (FieldType::Reference, None) => {
                        return bad(format!("reference `{cname}.{fname}` needs `to`"));
                    }
                    (FieldType::Reference, Some(to)) if !file.collections.contains_key(to) => {
                        return bad(format!(
                            "reference `{cname}.{fname}` points at unknown collection `{to}`"
                        ));
                    }
                    (t, Some(_)) if *t != FieldType::Reference => {
                        return bad(format!("`to` on non-reference field `{cname}.{fname}`"));
                    }
                    _ => {}
                }
                if f.normalize == Normalize::Email
                    && !matches!(f.ty, FieldType::String | FieldType::Text)
                {
                    return bad(format!(
                        "`normalize = \"email\"` on non-string `{cname}.{fname}`"
                    ));
                }
            }
            for g in &c.unique_groups {
                if !valid_name(&g.name) || c.fields.contains_key(&g.name) {
                    return bad(format!(
                        "unique group `{cname}.{}`: needs a valid name distinct from every field",
                        g.name
                    ));
                }
                if g.fields.len() < 2 {
                    return bad(format!(
                        "unique group `{cname}.{}` needs two or more fields",
                        g.name
                    ));
                }
                for f in &g.fields {
                    if !c.fields.contains_key(f) {
                        return bad(format!(
                            "unique group `{cname}.{}` names unknown field `{f}`",
                            g.name
                        ));
                    }
                }
            }
        }
        // The fingerprint hashes a canonical rendering (sorted maps, every
        // default spelled out), so formatting and key order do not matter.
        let canonical = serde_json::to_vec(&file.collections).expect("schema serializes");
        let fingerprint = crate::ids::hex_lower(&blake3::hash(&canonical).as_bytes()[..16]);
        Ok(Schema {
            collections: file.collections,
            fingerprint,
        })
    }

    /// The stable fingerprint two nodes compare before they sync.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The collections by name.
    pub fn collections(&self) -> &BTreeMap<String, CollectionDef> {
        &self.collections
    }

    /// One collection, or `UnknownCollection`.
    pub fn collection(&self, name: &str) -> Result<&CollectionDef> {
        self.collections
            .get(name)
            .ok_or_else(|| ModelError::UnknownCollection(name.to_string()))
    }

    /// One field, or `UnknownField`.
    pub fn field(&self, collection: &str, field: &str) -> Result<&FieldDef> {
        self.collection(collection)?
            .fields
            .get(field)
            .ok_or_else(|| ModelError::UnknownField {
                collection: collection.to_string(),
                field: field.to_string(),
            })
    }

    /// The unique keys of a collection: single unique fields, then groups.
    pub fn unique_keys(&self, collection: &str) -> Vec<UniqueKey> {
        let Ok(c) = self.collection(collection) else {
            return Vec::new();
        };
        let mut keys: Vec<UniqueKey> = c
            .fields
            .iter()
            .filter(|(_, f)| f.unique)
            .map(|(n, _)| UniqueKey {
                name: n.clone(),
                fields: vec![n.clone()],
            })
            .collect();
        keys.extend(c.unique_groups.iter().map(|g| UniqueKey {
            name: g.name.clone(),
            fields: g.fields.clone(),
        }));
        keys
    }

    /// Normalizes one value of a field for uniqueness comparison.
    pub fn normalize(&self, collection: &str, field: &str, value: &FieldValue) -> String {
        let norm = self
            .field(collection, field)
            .map(|f| f.normalize)
            .unwrap_or_default();
        norm.apply(&value.to_text())
    }

    /// Reference fields of a collection with their target collection.
    pub fn references(&self, collection: &str) -> Vec<(String, String)> {
        let Ok(c) = self.collection(collection) else {
            return Vec::new();
        };
        c.fields
            .iter()
            .filter_map(|(n, f)| f.to.as_ref().map(|to| (n.clone(), to.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schema_has_the_crm_core() {
        let s = Schema::default_crm();
        let keys: Vec<_> = s.unique_keys("contacts").iter().map(|k| k.code()).collect();
        assert_eq!(
            keys,
            vec![
                "DUPLICATE_EMAIL",
                "DUPLICATE_MEMBER_KEY",
                "DUPLICATE_USER_NAME"
            ]
        );
        assert_eq!(
            s.references("addresses"),
            vec![("contact_id".to_string(), "contacts".to_string())]
        );
        for c in ["contacts", "addresses", "phones", "notes", "groups", "tags"] {
            assert!(s.collection(c).is_ok(), "{c}");
        }
        assert_eq!(
            s.field("contacts", "bank_account").unwrap().policy,
            MergePolicy::Flag
        );
    }

    #[test]
    fn fingerprint_ignores_formatting_but_not_meaning() {
        let a = Schema::from_toml(
            "[collections.c]\nfields.a = { type = \"string\" }\nfields.b = { type = \"integer\" }\n",
        )
        .unwrap();
        let b = Schema::from_toml(
            "[collections.c.fields.b]\ntype = \"integer\"\n\n[collections.c.fields.a]\ntype = \"string\"\nrequired = false\n",
        )
        .unwrap();
        let c = Schema::from_toml(
            "[collections.c]\nfields.a = { type = \"string\", unique = true }\nfields.b = { type = \"integer\" }\n",
        )
        .unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
    }

    #[test]
    fn inconsistent_schemas_are_refused() {
        for bad in [
            "",
            "[collections.c]\nfields.a = { type = \"reference\" }\n",
            "[collections.c]\nfields.a = { type = \"reference\", to = \"nope\" }\n",
            "[collections.c]\nfields._a = { type = \"string\" }\n",
            "[collections.c]\nfields.a = { type = \"colour\" }\n",
            "[collections.c]\nfields.a = { type = \"integer\", normalize = \"email\" }\n",
            "[collections.c]\nfields.a = { type = \"string\", wat = 1 }\n",
            "[collections.c]\nfields.a = { type = \"string\" }\nunique_groups = [{ name = \"g\", fields = [\"a\", \"z\"] }]\n",
        ] {
            let e = Schema::from_toml(bad).unwrap_err();
            assert_eq!(e.code(), "INVALID_SCHEMA", "{bad:?}");
        }
    }

    #[test]
    fn normalization() {
        let s = Schema::default_crm();
        let v = FieldValue::String("  John.Smith@Example.ORG ".into());
        assert_eq!(
            s.normalize("contacts", "email", &v),
            "john.smith@example.org"
        );
        let k = FieldValue::String("  MK-1 ".into());
        assert_eq!(s.normalize("contacts", "member_key", &k), "MK-1");
    }
}
