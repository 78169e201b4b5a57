//! `SMALLEST_PROXY_<SECTION>_<KEY>` environment overrides, resolved against the config's own
//! serde schema so that every key any section declares can be set without this file knowing
//! it.
//!
//! The schema is read by deserialising [`super::Config`] from a probe: a serde `Deserializer`
//! that answers every `deserialize_struct` with the struct's field names (recording them) and
//! every leaf with a harmless sample, so the derived code walks the whole tree, `Option`s,
//! `Vec`s of tables and enums included. serde-reflection does the same for formats but needs
//! samples for custom types and refuses `deserialize_any` (untagged enums such as
//! `max_concurrent = "auto"` | number); the probe only needs names and leaf kinds, and a field
//! whose custom deserialiser refuses the sample is simply retried past (it stays a leaf of
//! unknown kind).
//!
//! A variable's name after the prefix, lower-cased, is matched against the field names from
//! the root down (`KEY_VAULT_AUTH_ROLE_ID` → `key.vault.auth.role_id`; underscores inside field
//! names are tried longest first, with backtracking). An array of tables (`[[limits.class]]`)
//! is set whole as an inline TOML array (`SMALLEST_PROXY_LIMITS_CLASS='[{name="tts", ...}]'`)
//! or per element by index (`SMALLEST_PROXY_LIMITS_CLASS_0_MAX_CONCURRENT=1`,
//! `SMALLEST_PROXY_LIMITS_CLASS_1='{name="stt", paths=["/waves/v1/stt"]}'`).
//!
//! Values are read as TOML reads them: a field that takes text keeps the variable as it is
//! (so `0660`, `5m` and `123` stay text; a quoted TOML string is unquoted); any other field
//! gets the value parsed as a TOML value when it parses (`8`, `true`, `1.5`, `[1000, 1001]`,
//! `{...}`) and the text otherwise (`5m` for a duration, `auto`), for serde to accept or refuse
//! with the variable's name.
//!
//! Names Kubernetes injects for a Service called `smallest-proxy` (`SMALLEST_PROXY_SERVICE_HOST`,
//! `SMALLEST_PROXY_PORT_8787_TCP_ADDR`, ...) are service links, not overrides: they are skipped
//! (the caller logs them at debug). No config key has such a name (a test keeps it so).

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use super::{Config, ConfigError, CONFIG_PATH_ENV, ENV_OVERRIDE_PREFIX};

/// What a schema path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A table with these fields.
    Table(Vec<&'static str>),
    /// An array; its element is at `path[]`.
    Array,
    /// A string (or an enum spelled as one).
    Text,
    /// A number or boolean.
    Scalar,
    /// A map with free keys, or a custom type the probe could not see into.
    Other,
}

/// Every path of the config schema (`key.vault.auth.role_id`, `limits.class[].name`) and what
/// it holds; the root table is at `""`.
pub(crate) fn schema() -> BTreeMap<String, Kind> {
    schema_of::<Config>()
}

/// [`schema`] for any deserialisable type.
fn schema_of<T: serde::de::DeserializeOwned>() -> BTreeMap<String, Kind> {
    let state = RefCell::new(ProbeState::default());
    // Each pass records what it reaches; a field whose sample was refused is skipped in the
    // next pass so the fields after it are reached too. Bounded by the number of fields.
    for _ in 0..256 {
        state.borrow_mut().failed_at = None;
        let result = T::deserialize(Probe {
            path: "",
            state: &state,
        });
        let mut s = state.borrow_mut();
        match (result, s.failed_at.take()) {
            (Err(_), Some(path)) if s.skip.insert(path.clone()) => continue,
            _ => break,
        }
    }
    state.into_inner().kinds
}

#[derive(Default)]
struct ProbeState {
    kinds: BTreeMap<String, Kind>,
    skip: BTreeSet<String>,
    failed_at: Option<String>,
}

#[derive(Clone, Copy)]
struct Probe<'a> {
    path: &'a str,
    state: &'a RefCell<ProbeState>,
}

// The probe owns its path string through a small wrapper so nested probes can borrow it.
struct OwnedProbe<'a> {
    path: String,
    state: &'a RefCell<ProbeState>,
}

impl<'a> Probe<'a> {
    fn record(&self, kind: Kind) {
        let mut state = self.state.borrow_mut();
        let entry = state.kinds.entry(self.path.to_string()).or_insert(Kind::Other);
        // A table or array seen once stays one (a later pass may see less).
        if matches!(entry, Kind::Other) || matches!(kind, Kind::Table(_) | Kind::Array) {
            *entry = kind;
        }
    }
}

#[derive(Debug)]
struct ProbeError(String);

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ProbeError {}
impl de::Error for ProbeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        ProbeError(msg.to_string())
    }
}

/// A sample every text leaf gets: it parses as a duration, a path and a name alike.
const TEXT_SAMPLE: &str = "1s";

macro_rules! scalar {
    ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
            self.record(Kind::Scalar);
            visitor.$visit($value)
        })*
    };
}

impl<'de, 'a> Deserializer<'de> for Probe<'a> {
    type Error = ProbeError;

    scalar! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i8(1),
        deserialize_i16 => visit_i16(1),
        deserialize_i32 => visit_i32(1),
        deserialize_i64 => visit_i64(1),
        deserialize_u8 => visit_u8(1),
        deserialize_u16 => visit_u16(1),
        deserialize_u32 => visit_u32(1),
        deserialize_u64 => visit_u64(1),
        deserialize_f32 => visit_f32(1.0),
        deserialize_f64 => visit_f64(1.0),
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Other);
        visitor.visit_u64(1)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Text);
        visitor.visit_char('1')
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Text);
        visitor.visit_str(TEXT_SAMPLE)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Other);
        visitor.visit_bytes(b"1")
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Other);
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, ProbeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Array);
        visitor.visit_seq(OneElement {
            probe: Some(OwnedProbe {
                path: format!("{}[]", self.path),
                state: self.state,
            }),
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, ProbeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.record(Kind::Other);
        visitor.visit_map(
            de::value::MapDeserializer::<std::iter::Empty<(&str, &str)>, ProbeError>::new(std::iter::empty()),
        )
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.record(Kind::Table(fields.to_vec()));
        let visit: Vec<&'static str> = {
            let state = self.state.borrow();
            fields
                .iter()
                .copied()
                .filter(|f| !state.skip.contains(&join(self.path, f)))
                .collect()
        };
        visitor.visit_map(Fields {
            parent: self.path.to_string(),
            fields: visit.into_iter(),
            current: None,
            state: self.state,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.record(Kind::Text);
        let first = variants.first().copied().unwrap_or(TEXT_SAMPLE);
        visitor.visit_enum(first.into_deserializer())
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_unit()
    }
}

impl<'de, 'a> Deserializer<'de> for &OwnedProbe<'a> {
    type Error = ProbeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_any(visitor)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_bool(visitor)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_i8(visitor)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_i16(visitor)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_i32(visitor)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_i64(visitor)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_u8(visitor)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_u16(visitor)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_u32(visitor)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_u64(visitor)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_f32(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_f64(visitor)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_char(visitor)
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_str(visitor)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_string(visitor)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_bytes(visitor)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_byte_buf(visitor)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_option(visitor)
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_unit(visitor)
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, n: &'static str, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_unit_struct(n, visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, n: &'static str, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_newtype_struct(n, visitor)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_seq(visitor)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_tuple(len, visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        n: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_tuple_struct(n, len, visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_map(visitor)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        n: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_struct(n, fields, visitor)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        n: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_enum(n, variants, visitor)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_identifier(visitor)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.borrowed().deserialize_ignored_any(visitor)
    }
}

impl<'a> OwnedProbe<'a> {
    fn borrowed(&self) -> Probe<'_> {
        Probe {
            path: &self.path,
            state: self.state,
        }
    }
}

fn join(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

/// A sequence of one probed element.
struct OneElement<'a> {
    probe: Option<OwnedProbe<'a>>,
}

impl<'de, 'a> SeqAccess<'de> for OneElement<'a> {
    type Error = ProbeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, ProbeError> {
        match self.probe.take() {
            Some(probe) => seed.deserialize(&probe).map(Some),
            None => Ok(None),
        }
    }
}

/// A struct's fields, each with a probe at its path; notes the field whose value failed.
struct Fields<'a> {
    parent: String,
    fields: std::vec::IntoIter<&'static str>,
    current: Option<String>,
    state: &'a RefCell<ProbeState>,
}

impl<'de, 'a> MapAccess<'de> for Fields<'a> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ProbeError> {
        let Some(field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = Some(join(&self.parent, field));
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ProbeError> {
        let probe = OwnedProbe {
            path: self.current.clone().unwrap_or_default(),
            state: self.state,
        };
        let result = seed.deserialize(&probe);
        if result.is_err() {
            let mut state = self.state.borrow_mut();
            // The innermost failure is noted first; outer fields only pass it on.
            if state.failed_at.is_none() {
                state.failed_at = Some(probe.path.clone());
            }
        }
        result
    }
}

/// Whether `name` is one Kubernetes injects for a Service (service links): `X_SERVICE_HOST`,
/// `X_SERVICE_PORT`, `X_SERVICE_PORT_<NAME>`, `X_PORT`, `X_PORT_<n>_<PROTO>` and its `_ADDR`,
/// `_PORT`, `_PROTO`.
pub fn is_service_link(name: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.ends_with("_SERVICE_PORT") || name.contains("_SERVICE_PORT_") {
        return true;
    }
    if name.ends_with("_PORT") {
        return true;
    }
    // `..._PORT_<n>_<PROTO>` with an optional `_ADDR` / `_PORT` / `_PROTO`.
    let parts: Vec<&str> = name.split('_').collect();
    parts.windows(3).enumerate().any(|(i, w)| {
        let rest = &parts[i + 3..];
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "TCP" | "UDP" | "SCTP")
            && (rest.is_empty() || (rest.len() == 1 && matches!(rest[0], "ADDR" | "PORT" | "PROTO")))
    })
}

/// The `SMALLEST_PROXY_*` variables in `vars` that are Kubernetes service links (skipped).
pub fn ignored_service_links(vars: &[(String, String)]) -> Vec<String> {
    vars.iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with(ENV_OVERRIDE_PREFIX) && name.as_str() != CONFIG_PATH_ENV)
        .filter(|name| is_service_link(name))
        .cloned()
        .collect()
}

/// One step of a resolved key path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Field(String),
    Index(usize),
}

/// The key path `rest` (lower case, after the prefix) names, with the schema path of its
/// target, or `None`.
fn resolve(schema: &BTreeMap<String, Kind>, at: &str, rest: &str) -> Option<(Vec<Step>, String)> {
    let Some(Kind::Table(fields)) = schema.get(at) else {
        return None;
    };
    let mut fields: Vec<&str> = fields.clone();
    fields.sort_by_key(|f| std::cmp::Reverse(f.len()));
    for field in fields {
        let path = join(at, field);
        if rest == field {
            return Some((vec![Step::Field(field.to_string())], path));
        }
        let Some(tail) = rest.strip_prefix(field).and_then(|t| t.strip_prefix('_')) else {
            continue;
        };
        let found = match schema.get(&path) {
            Some(Kind::Table(_)) => resolve(schema, &path, tail),
            Some(Kind::Array) => resolve_element(schema, &path, tail),
            _ => None,
        };
        if let Some((mut steps, target)) = found {
            steps.insert(0, Step::Field(field.to_string()));
            return Some((steps, target));
        }
    }
    None
}

/// `<n>` or `<n>_<key>` inside an array of tables at `path`.
fn resolve_element(schema: &BTreeMap<String, Kind>, path: &str, tail: &str) -> Option<(Vec<Step>, String)> {
    let element = format!("{path}[]");
    let (digits, after) = match tail.split_once('_') {
        Some((d, a)) => (d, Some(a)),
        None => (tail, None),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 4 {
        return None;
    }
    let index: usize = digits.parse().ok()?;
    match after {
        None => Some((vec![Step::Index(index)], element)),
        Some(after) => {
            let (mut steps, target) = resolve(schema, &element, after)?;
            steps.insert(0, Step::Index(index));
            Some((steps, target))
        }
    }
}

/// The TOML value a variable's text stands for, given what the field holds.
fn typed_value(kind: Option<&Kind>, text: &str) -> toml::Value {
    let parsed = || {
        toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    match kind {
        Some(Kind::Text) => match parsed() {
            Some(toml::Value::String(s)) if text.starts_with(['"', '\'']) => toml::Value::String(s),
            _ => toml::Value::String(text.to_string()),
        },
        _ => parsed().unwrap_or_else(|| toml::Value::String(text.to_string())),
    }
}

/// The dotted key path serde_path_to_error prints for `steps` (`limits.class[0].name`).
fn display_path(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Field(f) if out.is_empty() => out.push_str(f),
            Step::Field(f) => {
                out.push('.');
                out.push_str(f);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Merge the `SMALLEST_PROXY_*` variables of `vars` into `table`. Returns (key path, variable
/// name) for each applied override so errors can blame the variable.
pub(crate) fn apply(table: &mut toml::Table, vars: &[(String, String)]) -> Result<Vec<(String, String)>, ConfigError> {
    let schema = schema();
    let mut resolved = Vec::new();
    let mut names: Vec<&(String, String)> = vars.iter().collect();
    names.sort();
    for (name, value) in names {
        let Some(rest) = name.strip_prefix(ENV_OVERRIDE_PREFIX) else {
            continue;
        };
        if name == CONFIG_PATH_ENV || is_service_link(name) {
            continue;
        }
        let Some((steps, target)) = resolve(&schema, "", &rest.to_ascii_lowercase()) else {
            return Err(ConfigError {
                location: format!("environment variable {name}"),
                key: String::new(),
                message: format!("does not name a config key; overrides look like {ENV_OVERRIDE_PREFIX}LISTEN_ADDRESS (section, then key, in capitals)"),
            });
        };
        resolved.push((steps, target, name, value));
    }
    // In key order, indexes numerically: a whole array before its elements, element 2 before
    // element 10, so elements are filled in order whatever the environment's order.
    resolved.sort_by(|a, b| a.0.cmp(&b.0));
    let mut applied = Vec::new();
    for (steps, target, name, value) in resolved {
        let key = display_path(&steps);
        let typed = typed_value(schema.get(&target), value);
        set(table, &steps, typed).map_err(|message| ConfigError {
            location: format!("environment variable {name}"),
            key: key.clone(),
            message,
        })?;
        applied.push((key, name.clone()));
    }
    Ok(applied)
}

/// Put `value` at `steps` in `table`, creating tables (and array elements, in order) on the way.
fn set(table: &mut toml::Table, steps: &[Step], value: toml::Value) -> Result<(), String> {
    let mut node = &mut *table;
    let mut value = Some(value);
    let mut i = 0;
    while i < steps.len() {
        let Step::Field(field) = &steps[i] else {
            return Err("an index must follow an array's name".into());
        };
        let last = i + 1 == steps.len();
        if last {
            if let Some(value) = value.take() {
                node.insert(field.clone(), value);
            }
            return Ok(());
        }
        match &steps[i + 1] {
            Step::Index(index) => {
                let entry = node
                    .entry(field.clone())
                    .or_insert_with(|| toml::Value::Array(Vec::new()));
                let toml::Value::Array(array) = entry else {
                    return Err(format!("`{field}` is set to a value that is not an array of tables"));
                };
                if *index > array.len() {
                    return Err(format!(
                        "element {index} of `{field}` would leave a gap: there are {} (number them from 0, in order)",
                        array.len()
                    ));
                }
                if *index == array.len() {
                    array.push(toml::Value::Table(toml::Table::new()));
                }
                if i + 2 == steps.len() {
                    if let Some(value) = value.take() {
                        array[*index] = value;
                    }
                    return Ok(());
                }
                let toml::Value::Table(element) = &mut array[*index] else {
                    return Err(format!("element {index} of `{field}` is not a table"));
                };
                node = element;
                i += 2;
            }
            Step::Field(_) => {
                let entry = node
                    .entry(field.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(inner) = entry else {
                    return Err(format!("the config file sets `{field}` to a value, not a table"));
                };
                node = inner;
                i += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_reaches_every_section_and_optional_table() {
        let schema = schema();
        for table in [
            "listen",
            "key",
            "key.vault",
            "key.vault.auth",
            "key.aws",
            "limits",
            "limits.shared",
            "limits.class[]",
            "policy",
        ] {
            assert!(
                matches!(schema.get(table), Some(Kind::Table(_))),
                "{table}: {:?}",
                schema.get(table)
            );
        }
        assert_eq!(schema.get("limits.class"), Some(&Kind::Array));
        assert_eq!(schema.get("listen.address"), Some(&Kind::Text));
        assert_eq!(schema.get("listen.max_connections"), Some(&Kind::Scalar));
        assert_eq!(schema.get("limits.queue_timeout"), Some(&Kind::Text));
    }

    #[test]
    fn every_key_the_defaults_print_resolves_to_itself() {
        let schema = schema();
        let printed: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        let mut keys = Vec::new();
        fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                let path = join(prefix, k);
                match v {
                    toml::Value::Table(inner) => walk(&path, inner, out),
                    _ => out.push(path),
                }
            }
        }
        walk("", &printed, &mut keys);
        assert!(keys.len() > 30, "{keys:?}");
        for key in keys {
            let name = key.replace('.', "_");
            let (steps, _) = resolve(&schema, "", &name).unwrap_or_else(|| panic!("{key} does not resolve"));
            assert_eq!(display_path(&steps), key);
        }
    }

    #[test]
    fn no_config_key_looks_like_a_kubernetes_service_link() {
        for (path, _) in schema() {
            let name = format!(
                "{ENV_OVERRIDE_PREFIX}{}",
                path.replace("[]", "_0").replace('.', "_").to_ascii_uppercase()
            );
            assert!(!is_service_link(&name), "{path} would be skipped as a service link");
        }
    }

    /// Keys a section adds later need no change here: an untagged "auto"-or-number field, a
    /// map, an optional table and an array of tables inside a table all resolve.
    #[test]
    fn the_probe_sees_through_custom_and_untagged_types() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        #[serde(untagged)]
        enum Auto {
            Number(usize),
            Word(String),
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Route {
            name: String,
            #[serde(deserialize_with = "refuse")]
            picky: String,
            keyring: Option<Keyring>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Keyring {
            service: String,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Root {
            max_concurrent: Auto,
            headers: std::collections::HashMap<String, String>,
            route: Vec<Route>,
        }
        fn refuse<'de, D: Deserializer<'de>>(_: D) -> Result<String, D::Error> {
            Err(de::Error::custom("no"))
        }
        let schema = schema_of::<Root>();
        assert_eq!(schema.get("max_concurrent"), Some(&Kind::Other));
        let (steps, _) = resolve(&schema, "", "route_0_keyring_service").expect("past the refused field");
        assert_eq!(display_path(&steps), "route[0].keyring.service");
        assert_eq!(
            typed_value(schema.get("max_concurrent"), "auto"),
            toml::Value::String("auto".into())
        );
        assert!(resolve(&schema, "", "route_x_name").is_none());
    }

    #[test]
    fn service_link_shapes() {
        for name in [
            "SMALLEST_PROXY_SERVICE_HOST",
            "SMALLEST_PROXY_SERVICE_PORT",
            "SMALLEST_PROXY_SERVICE_PORT_HTTP",
            "SMALLEST_PROXY_PORT",
            "SMALLEST_PROXY_PORT_8787_TCP",
            "SMALLEST_PROXY_PORT_8787_TCP_ADDR",
            "SMALLEST_PROXY_PORT_8787_TCP_PORT",
            "SMALLEST_PROXY_PORT_8787_TCP_PROTO",
            "SMALLEST_PROXY_ADMIN_PORT_9090_UDP",
        ] {
            assert!(is_service_link(name), "{name}");
        }
        for name in [
            "SMALLEST_PROXY_LISTEN_ADDRESS",
            "SMALLEST_PROXY_PORT_X_TCP",
            "SMALLEST_PROXY_PORTS",
            "SMALLEST_PROXY_PORT_8787_TCP_HOST",
        ] {
            assert!(!is_service_link(name), "{name}");
        }
    }

    #[test]
    fn values_are_typed_as_toml_reads_them() {
        assert_eq!(typed_value(Some(&Kind::Scalar), "8"), toml::Value::Integer(8));
        assert_eq!(typed_value(Some(&Kind::Scalar), "true"), toml::Value::Boolean(true));
        assert_eq!(typed_value(Some(&Kind::Scalar), "1.5"), toml::Value::Float(1.5));
        assert_eq!(
            typed_value(Some(&Kind::Text), "0660"),
            toml::Value::String("0660".into())
        );
        assert_eq!(typed_value(Some(&Kind::Text), "123"), toml::Value::String("123".into()));
        assert_eq!(
            typed_value(Some(&Kind::Text), "\"quoted\""),
            toml::Value::String("quoted".into())
        );
        assert_eq!(typed_value(Some(&Kind::Text), "5m"), toml::Value::String("5m".into()));
        assert_eq!(
            typed_value(Some(&Kind::Other), "auto"),
            toml::Value::String("auto".into())
        );
        assert_eq!(typed_value(Some(&Kind::Other), "3"), toml::Value::Integer(3));
        assert_eq!(
            typed_value(Some(&Kind::Array), "[1000, 1001]"),
            toml::Value::Array(vec![toml::Value::Integer(1000), toml::Value::Integer(1001)])
        );
    }
}
